"""GRPO: ``pama_ext.rl.group_advantages`` (per-objective group-relative advantages) against a
float64 loop reference, and the main job's ``--estimator grpo`` end to end."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pama_ext.rl import group_advantages


def _reference(scores, g, scale, eps=1e-4):
    """Loop over groups and objectives in float64 (TRL's formula)."""
    x = scores.double() if scores.dim() == 2 else scores.double()[:, None]
    out = torch.zeros_like(x)
    for i in range(x.shape[1]):
        col = x[:, i]
        batch_std = float(col.std()) if len(col) > 1 else 0.0
        for start in range(0, len(col), g):
            grp = col[start : start + g]
            centred = grp - grp.mean()
            if scale == "group":
                centred = centred / ((float(grp.std()) if g > 1 else 0.0) + eps)
            elif scale == "batch":
                centred = centred / (batch_std + eps)
            out[start : start + g, i] = centred
    return out if scores.dim() == 2 else out[:, 0]


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 5), g=st.integers(1, 6), n=st.integers(1, 4), scale=st.sampled_from(["group", "batch", "none"]),
       seed=st.integers(0, 10_000), ties=st.booleans())
def test_group_advantages_match_the_reference(groups, g, n, scale, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups * g, n, generator=gen, dtype=torch.float64)
    if ties:  # whole groups with one score: their advantage must be exactly 0
        scores[:g] = 0.5
    got = group_advantages(scores, g, scale)
    torch.testing.assert_close(got, _reference(scores, g, scale), rtol=1e-12, atol=1e-12)
    grouped = got.reshape(groups, g, n)
    torch.testing.assert_close(grouped.sum(1), torch.zeros(groups, n, dtype=torch.float64), atol=1e-9, rtol=0)
    if ties:
        assert bool((got[:g] == 0).all())
    if scale == "group" and g > 1:  # unit std in every group that is not constant
        std = grouped.std(dim=1)
        spread = scores.reshape(groups, g, n).std(dim=1)
        ok = spread > 1e-2
        torch.testing.assert_close(std[ok], (spread / (spread + 1e-4))[ok], rtol=1e-9, atol=1e-9)


def test_group_advantages_one_objective_and_float32():
    s = torch.tensor([1.0, 3.0, 2.0, 2.0])
    a = group_advantages(s, 2)
    assert a.shape == (4,) and a.dtype == torch.float32
    assert a.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0], rel=1e-6)
    # each objective is normalised on its own: scaling one objective's scores changes it only through eps
    two = torch.stack([s, 1000 * s], dim=1)
    torch.testing.assert_close(group_advantages(two, 2)[:, 1], a, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(6, 2), 4), "not a multiple of group_size=4"),
        ((torch.zeros(6, 2), 0), "`group_size` must be an int >= 1"),
        ((torch.zeros(6, 2), True), "`group_size` must be an int >= 1"),
        ((torch.zeros(6, 2, 1), 2), r"`scores` must be a float tensor \[B, N\] or \[B\], got \(6, 2, 1\)"),
        ((torch.zeros(6, dtype=torch.long), 2), "`scores` must be a float tensor"),
        (([1.0, 2.0], 2), "got list"),
    ],
)
def test_group_advantages_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(*args)
    with pytest.raises(ValueError, match="`scale` must be one of"):
        group_advantages(torch.zeros(4, 1), 2, scale="whiten")


# --------------------------------------------------------------------------- the demo
transformers = pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

from pama_ext.examples.rlhf_demo import cli, ppo  # noqa: E402

TINY = ["--steps", "2", "--warmup-steps", "5", "--batch", "8", "--epochs", "2", "--max-new-tokens", "8",
        "--eval-every", "1", "--eval-samples", "1", "--no-progress"]


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, 5.0]])
    mask = torch.tensor([[True, True, False]])  # the unmasked 8-nat gap must not count
    r = -0.5
    assert float(ppo.k3_kl(logp, ref, mask)) == pytest.approx((math.exp(r) - r - 1) / 2)
    assert float(ppo.k3_kl(logp, logp, mask)) == 0.0
    assert float(ppo.k3_kl(logp, ref, torch.zeros_like(mask))) == 0.0


def test_demo_grpo_end_to_end(tmp_path, one_thread):
    """--estimator grpo: every method trains on group-normalised [B, N] advantages; each
    rollout holds batch / group_size prompts, group_size samples each; no value loss; with
    --kl-penalty loss the KL term is in the loss with its fixed coefficient; the generation
    uses transformers' cache interface (no deprecation warning)."""
    methods = ["pama", "pama_token", "pama_batch", "pama_sequence", "pama_batch_mean", "linear", "mgda_ub"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        s = cli.main([*TINY, "--estimator", "grpo", "--group-size", "4", "--kl-penalty", "loss", "--loss-kl-coef", "0.1",
                      "--objectives", "sentiment,length", "--methods", ",".join(methods), "--seeds", "0",
                      "--out", str(tmp_path / "o")])
    assert s["config"]["ppo"]["estimator"] == "grpo" and s["config"]["ppo"]["group_size"] == 4
    for r in s["runs"]:
        for h in r["history"]:
            # h["kl"] is the sampled estimate mean_b sum_t (old_logp - ref_logp): it may be
            # slightly negative on a tiny run; the k3 term in the loss is >= 0 by construction
            assert "value_loss" not in h and math.isfinite(h["kl"]) and math.isfinite(h["kl_loss"])
            assert h["kl_loss"] >= 0.0 and h["kl_coef"] == 0.1
            w = h["weights"]
            assert len(w) == 2 and sum(w) == pytest.approx(1.0, abs=1e-5) and min(w) >= -1e-7
        assert r["history"][0]["kl_loss"] >= 0.0
    firsts = [r["history"][0]["rewards"] for r in s["runs"]]
    assert all(f == firsts[0] for f in firsts)  # the same first rollout for every method


def test_demo_grpo_puts_the_kl_in_every_objectives_reward(monkeypatch, tmp_path, one_thread):
    """The default --kl-penalty reward under grpo: each objective's sequence reward is its
    score minus beta times the response's KL (the spec's per-token penalty summed, gamma 1),
    the same shift in every objective, before the group normalisation; beta adapts; no k3
    term in the loss."""
    seen, scores, last = [], [], {}
    real_group, real_score = ppo.group_advantages, ppo.score_all

    def spy_score(*a, **k):  # the evaluation scores too: keep the latest
        last["scores"] = real_score(*a, **k)
        return last["scores"]

    def spy_group(rewards, group_size, *a, **k):  # the training rollout's, just scored
        seen.append(rewards.clone())
        scores.append(last["scores"].clone())
        return real_group(rewards, group_size, *a, **k)

    monkeypatch.setattr(ppo, "group_advantages", spy_group)
    monkeypatch.setattr(ppo, "score_all", spy_score)
    s = cli.main([*TINY, "--estimator", "grpo", "--group-size", "4", "--steps", "3", "--eval-every", "3",
                  "--objectives", "sentiment,length", "--methods", "pama", "--seeds", "0", "--out", str(tmp_path / "o")])
    (run,) = s["runs"]
    hist = run["history"]
    assert all("kl_loss" not in h for h in hist)
    assert hist[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    for step in (1, 2):
        shift = seen[step] - scores[step]  # [B, 2]
        torch.testing.assert_close(shift[:, 0], shift[:, 1], rtol=0, atol=1e-6)  # the same KL in every objective
        beta = hist[step - 1]["kl_coef"]  # the coefficient after the previous rollout's update
        prev = 0.2 if step == 1 else hist[step - 2]["kl_coef"]
        err = min(max(hist[step - 1]["kl"] / 3.0 - 1.0, -0.2), 0.2)
        assert beta == pytest.approx(prev * (1 + err * 8 / 256), rel=1e-12) and beta != prev  # adapted (horizon 256)
        assert float(-shift[:, 0].mean()) / beta == pytest.approx(hist[step]["kl"], rel=1e-4, abs=1e-6)
    assert any(float(seen[k].sub(scores[k]).abs().max()) > 0 for k in (1, 2))


def test_demo_grpo_shared_kl_after_the_normalisation(monkeypatch, tmp_path, one_thread):
    """--kl-penalty shared: the group normalisation sees the scores alone, and -beta times the
    response's KL, centred in its group, is added to every objective's advantage; gae refuses it."""
    seen, scores, centred, last = [], [], [], {}
    real_group, real_score = ppo.group_advantages, ppo.score_all

    def spy_score(*a, **k):
        last["scores"] = real_score(*a, **k)
        return last["scores"]

    def spy_group(rewards, group_size, *a, **k):
        out = real_group(rewards, group_size, *a, **k)
        if k.get("scale") == "none":  # the KL, centred in its group
            centred.append((rewards.clone(), out.clone()))
        else:  # the scores, normalised
            seen.append(rewards.clone())
            scores.append(last["scores"].clone())
        return out

    monkeypatch.setattr(ppo, "group_advantages", spy_group)
    monkeypatch.setattr(ppo, "score_all", spy_score)
    s = cli.main([*TINY, "--estimator", "grpo", "--kl-penalty", "shared", "--steps", "3", "--eval-every", "3",
                  "--objectives", "sentiment,length", "--methods", "pama", "--seeds", "0", "--out", str(tmp_path / "o")])
    hist = s["runs"][0]["history"]
    assert len(seen) == len(centred) == 3
    for k in range(3):
        torch.testing.assert_close(seen[k], scores[k], rtol=0, atol=0)  # no KL inside the normalisation
        x, out = centred[k]
        torch.testing.assert_close(out, x - x.reshape(-1, 4).mean(1).repeat_interleave(4))
        assert float(x.sum()) / len(x) == pytest.approx(hist[k]["kl"], rel=1e-4, abs=1e-6)  # the responses' KL
    assert float(centred[1][1].abs().max()) > 0 and hist[1]["kl_coef"] != 0.2  # a real KL, an adapted beta
    with pytest.raises(SystemExit):
        cli.parse_args(["--kl-penalty", "shared"])  # gae
    with pytest.raises(ValueError, match="grpo"):
        ppo.train("pama", 0, None, None, [], [], None, ppo.PPOConfig(kl_penalty="shared"), 1, 1, torch.device("cpu"))


def test_demo_gae_with_the_kl_in_the_loss(tmp_path, one_thread):
    """--kl-penalty loss: GAE on scores alone, the value loss and a k3 KL term of its own with
    a fixed coefficient (no adaptation)."""
    s = cli.main([*TINY, "--kl-penalty", "loss", "--loss-kl-coef", "0.3", "--objectives", "sentiment,length",
                  "--methods", "pama_token,linear", "--seeds", "0", "--out", str(tmp_path / "o")])
    for r in s["runs"]:
        for h in r["history"]:
            assert math.isfinite(h["value_loss"]) and h["kl_loss"] >= 0 and h["kl_coef"] == 0.3
    with pytest.raises(SystemExit):
        cli.parse_args(["--kl-penalty", "advantage"])


def test_grpo_rollout_holds_groups(monkeypatch, one_thread):
    """The prompts of one rollout come in groups of group_size identical prompts, and the
    advantages the loss sees are group_advantages of the scores."""
    seen = {}
    real_generate, real_loss = ppo.generate, ppo.pama_ext.PAMA.loss

    def spy_generate(model, tok, prompts, *a, **k):
        seen.setdefault("prompts", list(prompts))
        return real_generate(model, tok, prompts, *a, **k)

    def spy_loss(self, logp, old, adv, mask, **k):
        seen.setdefault("adv", adv.clone())
        return real_loss(self, logp, old, adv, mask, **k)

    monkeypatch.setattr(ppo, "generate", spy_generate)
    monkeypatch.setattr(ppo.pama_ext.PAMA, "loss", spy_loss)
    args = cli.parse_args([*TINY, "--estimator", "grpo", "--group-size", "4", "--objectives", "sentiment,length",
                           "--warmup-steps", "0", "--steps", "1"])
    from pama_ext.examples.rlhf_demo.steering import RunSpec

    model, tok = ppo_policy()
    ctx = cli.make_context(args, torch.device("cpu"), model, tok)
    run = ctx.run(RunSpec("linear", 0), initial=[0.0, 1.0])
    p = seen["prompts"]
    assert len(p) == 8 and p[0:4] == [p[0]] * 4 and p[4:8] == [p[4]] * 4
    adv = seen["adv"]
    assert adv.shape == (8, 2)
    torch.testing.assert_close(adv.reshape(2, 4, 2).sum(1), torch.zeros(2, 2), atol=1e-5, rtol=0)
    assert len(run["history"]) == 1


def ppo_policy():
    from pama_ext.examples.rlhf_demo import policy as demo_policy

    tok = demo_policy.build_tokenizer()
    return demo_policy.build_tiny_gpt2(tok, seed=0, n_embd=32, n_layer=1, n_head=2, n_positions=48).eval(), tok


def test_grpo_arguments_are_checked():
    for bad in (["--estimator", "grpo", "--batch", "6", "--group-size", "4"],
                ["--estimator", "grpo", "--group-size", "1"],
                ["--estimator", "reinforce"],
                ["--group-size", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    cfg = ppo.PPOConfig(estimator="grpo", batch=6, group_size=4)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        ppo.train("linear", 0, None, None, [], [], None, cfg, 1, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown estimator"):
        ppo.train("linear", 0, None, None, [], [], None, ppo.PPOConfig(estimator="td"), 1, 1, torch.device("cpu"))


def test_demo_ablation_methods(tmp_path, one_thread):
    """The fidelity ablations (benchmarks/FIDELITY.md) run under both estimators, and their
    logged weights are on the simplex."""
    for estimator in ("gae", "grpo"):
        s = cli.main([*TINY, "--estimator", estimator, "--objectives", "sentiment,length",
                      "--methods", "noon_linear,pama_token_signed,pama_token_abstain", "--seeds", "0",
                      "--out", str(tmp_path / estimator)])
        assert [r["method"] for r in s["runs"]] == ["noon_linear", "pama_token_signed", "pama_token_abstain"]
        for r in s["runs"]:
            for h in r["history"]:
                w = h["weights"]
                assert len(w) == 2 and sum(w) == pytest.approx(1.0, abs=1e-5) and min(w) >= -1e-7
                assert math.isfinite(h["policy_loss"])


def _diagnosis_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "grpo_kl_diagnosis.py"
    spec = importlib.util.spec_from_file_location("grpo_kl_diagnosis", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grpo_kl_diagnosis_summary():
    """The diagnosis's figures on a log whose answer is known: two groups of 2, the KL term
    equal to objective 0's advantage direction and opposite to objective 1's."""
    diag = _diagnosis_module()
    scores = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
    kl_term = torch.tensor([-1.0, 1.0, -3.0, 3.0], dtype=torch.float64)
    rewards = scores + kl_term[:, None]
    adv = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    log = [{"scores": scores}, {"scores": scores, "rewards": scores.clone(), "adv": adv, "g": 2},  # KL 0: skipped
           {"scores": scores, "rewards": rewards, "adv": adv, "g": 2}, {"scores": scores[:1]}]  # held-out: skipped
    s = diag.summarise(log, ["a", "b"])
    assert s["rollouts"] == 1
    assert s["kl_term_group_var"] == pytest.approx(10.0)  # median of the groups' variances 2 and 18
    assert s["objectives"]["a"]["score_var"] == pytest.approx(1.25)  # groups (0, 1): 0.5; (2, 4): 2
    assert s["objectives"]["a"]["kl_corr"] == pytest.approx(2 / math.sqrt(5), rel=1e-9)  # 8 / (2 * sqrt(20))
    assert s["objectives"]["b"]["kl_corr"] == pytest.approx(-2 / math.sqrt(5), rel=1e-9)
    bad = [{"scores": scores, "rewards": rewards + torch.tensor([0.0, 1.0]), "adv": adv, "g": 2}]
    with pytest.raises(RuntimeError, match="score - beta KL"):
        diag.summarise(bad, ["a", "b"])


def test_grpo_kl_diagnosis_runs_the_demo(tmp_path, one_thread):
    """End to end on the tiny demo: it sees every GRPO rollout, and the demo's functions are
    restored afterwards."""
    diag = _diagnosis_module()
    score_all, group_advantages = ppo.score_all, ppo.group_advantages
    out = diag.main(["--objectives", "sentiment,length,diversity", "--methods", "pama_token", "--seeds", "0",
                     "--steps", "3", "--out", str(tmp_path), *TINY[2:]])  # TINY[:2] is its --steps
    assert ppo.score_all is score_all and ppo.group_advantages is group_advantages
    s = out["pama_token"]
    assert s["rollouts"] == 2  # rollouts 2 and 3 (the first has KL 0)
    assert s["kl_term_group_var"] > 0
    for d in s["objectives"].values():  # a score constant on every rollout has no correlation
        assert d["score_var"] >= 0 and -1 <= d["kl_corr"] <= 1
        assert -1 <= d["score_kl_corr"] <= 1 or (math.isnan(d["score_kl_corr"]) and d["score_var"] == 0)
    assert (tmp_path / "grpo_kl_diagnosis_n3.json").exists()
