"""The demo's policy: the embedded small GPT-2 (built from a config over the word-level
vocabulary of ``corpus``, then warmed up on generated reviews) or a local Hugging Face
checkpoint (``--model PATH``)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import corpus


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``corpus.vocabulary()`` (whitespace and
    punctuation split; <eos> doubles as the start token, as in GPT-2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(corpus.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=corpus.UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=corpus.PAD, eos_token=corpus.EOS, bos_token=corpus.EOS, unk_token=corpus.UNK
    )
    return prepare_tokenizer(out)


def prepare_tokenizer(tokenizer):
    """Left padding for generation; a pad token (the end token when the tokenizer has none)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: the demo needs an end-of-sequence token to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_gpt2(tokenizer, *, seed: int, n_embd: int = 96, n_layer: int = 2, n_head: int = 4, n_positions: int = 96):
    """A small ``GPT2LMHeadModel`` from a config (no download), over ``tokenizer``'s vocabulary."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,  # no dropout: PPO's ratio must compare the same function twice
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def load_pretrained(path: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` from a local Hugging Face checkpoint directory (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--model {path!r}: not a directory (a local Hugging Face checkpoint is expected)")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(p, local_files_only=True))
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(p, **kwargs).to(device)
    _disable_dropout(model)
    return model, tokenizer


def _disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probabilities of the same function at rollout and at update time."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def encode_texts(tokenizer, texts: Sequence[str], device: torch.device, *, add_eos: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask of ``<bos> text [<eos>]`` for every text (the
    start token is the tokenizer's bos, or its eos when it has none, as in GPT-2)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    rows: List[List[int]] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        rows.append([bos] + ids + ([eos] if add_eos else []))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def warm_up(
    model: nn.Module,
    tokenizer,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    batch: int = 32,
    lr: float = 3e-3,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Supervised warm-up on generated reviews (next-token loss on every real token, the
    closing <eos> included), so the policy writes words before RL starts. Returns the
    per-step losses."""
    texts = corpus.reviews(steps * batch, seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses: List[float] = []
    for step in range(steps):
        chunk = texts[step * batch : (step + 1) * batch]
        rng.shuffle(chunk)
        ids, mask = encode_texts(tokenizer, chunk, device, add_eos=True)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        target = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)  # token t + 1 from the prefix up to t
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
