"""MultiHeadValueModel: N value heads on a tiny GPT-2 built from a config (no downloads)."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pama_ext.rl.value_heads as vh  # noqa: E402
from pama_ext.rl import MultiHeadValueModel, add_value_heads, per_objective_gae  # noqa: E402

B, T, N, VOCAB = 3, 7, 3, 50


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,  # no dropout: train-mode outputs are comparable
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :2] = 0  # a left-padded row
    return ids, attn


def train_steps(model, ids, attn, steps=3):
    """A few Adam steps regressing the heads (and the body) on fixed per-objective targets."""
    targets = torch.linspace(-1.0, 1.0, N).expand(B, T, N)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        _, values = model(ids, attention_mask=attn)
        loss = ((values - targets) ** 2)[attn.bool()].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_forward_shapes_and_logits_unchanged():
    lm = tiny_gpt2()
    model = MultiHeadValueModel(lm, N, objective_names=["helpful", "harmless", "short"])
    ids, attn = batch()
    logits, values = model(ids, attention_mask=attn)
    assert logits.shape == (B, T, VOCAB) and values.shape == (B, T, N)
    assert values.dtype == torch.float32
    assert (values == 0).all()  # zero-initialised heads
    with torch.no_grad():
        plain = lm(ids, attention_mask=attn).logits
    assert torch.equal(logits.detach(), plain)  # the wrapper adds heads, nothing else
    assert model.config is lm.config
    assert isinstance(add_value_heads(tiny_gpt2(), 2), MultiHeadValueModel)


def test_training_steps_reduce_value_loss_and_reach_the_body():
    model = MultiHeadValueModel(tiny_gpt2(), N)
    ids, attn = batch()
    body_before = model.model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    losses = train_steps(model, ids, attn, steps=5)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.model.transformer.h[0].mlp.c_fc.weight, body_before)
    _, values = model(ids, attention_mask=attn)
    # the heads learnt different targets: objectives are ordered as the targets are
    mean = values.detach()[attn.bool()].mean(0)
    assert mean[0] < mean[1] < mean[2]


@pytest.mark.parametrize("safe", [True, False])
def test_save_and_load_round_trip(tmp_path, safe):
    model = MultiHeadValueModel(tiny_gpt2(), N, objective_names=["a", "b", "c"])
    ids, attn = batch()
    train_steps(model, ids, attn)
    model.eval()
    with torch.no_grad():
        logits, values = model(ids, attention_mask=attn)
    model.save_pretrained(str(tmp_path), safe_serialization=safe)
    files = set(os.listdir(tmp_path))
    assert vh.HEADS_CONFIG in files and "config.json" in files
    assert (vh.HEADS_SAFETENSORS if safe else vh.HEADS_TORCH) in files
    assert (vh.HEADS_TORCH if safe else vh.HEADS_SAFETENSORS) not in files
    cfg = json.loads((tmp_path / vh.HEADS_CONFIG).read_text())
    assert cfg["num_objectives"] == N and cfg["hidden_size"] == 32 and cfg["objective_names"] == ["a", "b", "c"]

    loaded = MultiHeadValueModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.num_objectives == N and loaded.objective_names == ["a", "b", "c"]
    with torch.no_grad():
        logits2, values2 = loaded(ids, attention_mask=attn)
    assert torch.equal(logits, logits2) and torch.equal(values, values2)
    # the LM directory alone is still an ordinary transformers checkpoint
    lm_only = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(lm_only(ids, attention_mask=attn).logits, logits)


def test_load_onto_a_given_model_and_state_dict(tmp_path):
    model = MultiHeadValueModel(tiny_gpt2(), N)
    ids, attn = batch()
    train_steps(model, ids, attn, steps=2)
    model.eval()
    model.save_pretrained(str(tmp_path))
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    loaded = MultiHeadValueModel.from_pretrained(str(tmp_path), model=lm).eval()
    assert loaded.model is lm
    # an ordinary state_dict round trip works too (checkpoints inside a training loop)
    fresh = MultiHeadValueModel(tiny_gpt2(seed=5), N).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        v0 = model(ids, attention_mask=attn).values
        assert torch.equal(loaded(ids, attention_mask=attn).values, v0)
        assert torch.equal(fresh(ids, attention_mask=attn).values, v0)


def test_values_feed_gae():
    model = MultiHeadValueModel(tiny_gpt2(), N)
    ids, attn = batch()
    train_steps(model, ids, attn, steps=1)
    with torch.no_grad():
        _, values = model(ids, attention_mask=attn)
    rewards = torch.randn(B, T, N)
    adv, ret = per_objective_gae(rewards, values, attn.bool())
    assert adv.shape == (B, T, N) and torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_generate_passes_through():
    model = MultiHeadValueModel(tiny_gpt2(), 2).eval()
    ids, _ = batch()
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, T + 3)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="`num_objectives` must be an int >= 1, got 0"):
        MultiHeadValueModel(tiny_gpt2(), 0)
    with pytest.raises(ValueError, match="`objective_names` has 2 names for num_objectives = 3"):
        MultiHeadValueModel(tiny_gpt2(), 3, objective_names=["a", "b"])
    with pytest.raises(TypeError, match="must be a transformers model with a config"):
        MultiHeadValueModel(torch.nn.Linear(2, 2), 2)
    with pytest.raises(FileNotFoundError, match="no value_heads_config.json"):
        MultiHeadValueModel.from_pretrained(str(tmp_path))
    model = MultiHeadValueModel(tiny_gpt2(), 2)
    model.save_pretrained(str(tmp_path))
    other = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match=r"weight shape \[2, 32\], expected .* \[2, 16\]"):
        MultiHeadValueModel.from_pretrained(str(tmp_path), model=other)
