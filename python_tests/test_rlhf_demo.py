"""The main job, ``python -m pama_ext.examples.rlhf_demo``: its parts (corpus, tokenizer,
scorers, rollouts, hypervolume) and the whole pipeline end to end with a few steps,
including a policy and a reward model loaded from directories the test saves itself."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

import transformers  # noqa: E402

from pama_ext.examples.rlhf_demo import cli, corpus, ppo, report  # noqa: E402
from pama_ext.examples.rlhf_demo import policy as demo_policy  # noqa: E402
from pama_ext.examples.rlhf_demo import rewards as demo_rewards  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [  # a few seconds per run on one CPU thread
    "--steps", "2", "--warmup-steps", "5", "--batch", "8", "--epochs", "2", "--max-new-tokens", "8",
    "--eval-every", "1", "--eval-samples", "1", "--no-progress",
]


# --------------------------------------------------------------------------- corpus, tokenizer
def test_vocabulary_covers_the_corpus_and_prompts():
    vocab = corpus.vocabulary()
    assert len(vocab) == len(set(vocab)) and vocab[:3] == [corpus.PAD, corpus.EOS, corpus.UNK]
    train, held = corpus.prompts()
    words = corpus.word_counts(corpus.reviews(500, seed=3) + train + held)
    assert set(words) <= set(vocab)
    assert held and train and not set(held) & set(train)
    # every review starts with a prompt opening: the prompts are in distribution
    openings = [o.format(n=n) for o in corpus.OPENERS for n in corpus.NOUNS]
    assert all(any(r.startswith(o + " ") for o in openings) for r in corpus.reviews(200, seed=4))


def test_reviews_are_deterministic_and_varied():
    a, b = corpus.reviews(300, seed=7), corpus.reviews(300, seed=7)
    assert a == b and corpus.reviews(300, seed=8) != a
    lengths = [len(r.split()) for r in a]
    assert min(lengths) < 10 and max(lengths) > 30  # the length objective has room both ways


def test_word_tokenizer_round_trip():
    tok = demo_policy.build_tokenizer()
    text = "this film was really great ! i loved the ending ."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    ids2, mask = demo_policy.encode_texts(tok, ["the plot", "i thought the movie"], torch.device("cpu"), add_eos=True)
    assert ids2.shape == mask.shape == (2, 6)
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1]  # left padding
    assert ids2[0, 2] == tok.eos_token_id and ids2[0, -1] == tok.eos_token_id  # <eos> text <eos>
    assert demo_policy.positions(mask)[0].tolist() == [0, 0, 0, 1, 2, 3]


# --------------------------------------------------------------------------- scorers
def test_scorers():
    objs = demo_rewards.build_objectives(
        ["sentiment", "length", "diversity", "conciseness"], max_new_tokens=30, device=torch.device("cpu")
    )
    prompts = ["the movie", "the movie", "the movie"]
    responses = ["was great , i loved it !", "was terrible and boring .", "was great great great great great"]
    lengths = [7, 5, 6]
    r = demo_rewards.score_all(objs, prompts, responses, lengths)
    assert r.shape == (3, 4) and r.dtype == torch.float32
    assert r[0, 0] > 0.5 and r[1, 0] < -0.5  # VADER
    # clip(l / (30 / 1.5), 0.5, 1.5): the paper's form scaled to the budget
    assert r[:, 1].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert demo_rewards.clipped_length(15, 20.0) == pytest.approx(0.75)
    assert demo_rewards.clipped_length(30, 20.0) == pytest.approx(1.5)
    assert demo_rewards.clipped_length(100, 20.0) == pytest.approx(1.5)
    assert r[2, 2] == pytest.approx(2 / 6)  # "was" + 5 x "great": 2 distinct of 6 words
    assert r[0, 2] == pytest.approx(1.0)  # punctuation is not a word
    assert r[:, 3].tolist() == pytest.approx([1 - 7 / 30, 1 - 5 / 30, 1 - 6 / 30])
    assert demo_rewards.lexical_diversity("") == 0.0 and demo_rewards.lexical_diversity(". !") == 0.0
    assert [o.lower for o in objs] == [-1.0, 0.5, 0.0, 0.0]


@pytest.mark.parametrize(
    "names, kwargs, match",
    [
        (["sentiment", "nope"], {}, "unknown objective 'nope'"),
        (["length", "length"], {}, "twice"),
        ([], {}, "at least one"),
        (["reward_model"], {}, "needs --reward-model"),
        (["length"], {"reward_model": "/x"}, "not in --objectives"),
    ],
)
def test_build_objectives_rejects(names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo_rewards.build_objectives(names, max_new_tokens=10, device=torch.device("cpu"), **kwargs)


# --------------------------------------------------------------------------- rollouts
def _tiny_policy(seed=0):
    tok = demo_policy.build_tokenizer()
    model = demo_policy.build_tiny_gpt2(tok, seed=seed, n_embd=32, n_layer=1, n_head=2, n_positions=48)
    return model.eval(), tok


def test_generation_matches_a_full_forward_under_left_padding(one_thread):
    """The KV-cache sampler and the training forward see the same distribution: the
    log-probability of every sampled token equals the one the PPO forward computes (so the
    first PPO ratio is 1), with prompts of different lengths (left padding)."""
    model, tok = _tiny_policy()
    vmodel = ppo.MultiHeadValueModel(model, 3)
    banned = ppo.banned_logits(tok, model.config.vocab_size, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    prompts = ["the plot", "in my opinion the movie", "this film was", "honestly , the cast"]
    ro = ppo.generate(model, tok, prompts, 12, gen, banned)
    B, T = ro.responses.shape
    assert B == 4 and 1 <= T <= 12 and ro.response_mask.shape == (B, T)
    logp, values, hidden = ppo.forward(vmodel, ro, banned)
    m = ro.response_mask
    torch.testing.assert_close(logp[m], ro.sample_logp[m], rtol=1e-4, atol=1e-4)
    assert values.shape == (B, T, 3) and hidden.shape[:2] == ro.sequences.shape
    # masks: live up to and including the end token, lengths exclude it, never pad/unk
    for i in range(B):
        row, n = ro.responses[i][m[i]].tolist(), ro.lengths[i]
        ended = tok.eos_token_id in row
        assert len(row) == n + int(ended) and (not ended or row.index(tok.eos_token_id) == n)
        assert tok.pad_token_id not in row[:n] and tok.unk_token_id not in row
    assert bool(torch.isinf(banned[[tok.pad_token_id, tok.unk_token_id]]).all()) and banned[tok.eos_token_id] == 0


def test_value_loss_and_mean_weights():
    v = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    old = torch.zeros_like(v)
    ret = torch.zeros_like(v)
    mask = torch.tensor([[True], [False]])
    # clipped to +-0.2 from old; max(unclipped, clipped) error: (1 + 4) / 2 heads, halved
    assert float(ppo.value_loss(v, old, ret, mask, 0.2)) == pytest.approx(0.5 * 2.5)
    w = torch.tensor([[[0.2, 0.8], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]])
    m = torch.tensor([[True, True], [True, False]])
    assert ppo.mean_weights(w, m) == pytest.approx([1.7 / 3, 1.3 / 3])
    assert ppo.mean_weights(torch.tensor([0.25, 0.75]), m) == [0.25, 0.75]


def test_adaptive_kl_moves_towards_target():
    c = ppo.AdaptiveKL(0.2, target=3.0, horizon=100)
    c.update(6.0, n=10)  # error clipped at +0.2
    assert c.value == pytest.approx(0.2 * 1.02)
    c.update(0.0, n=10)
    assert c.value == pytest.approx(0.2 * 1.02 * 0.98)


def test_demo_kl_horizon_sets_the_controller_rate(tmp_path, one_thread):
    """--kl-horizon reaches the controller: after every rollout beta moves by
    clip(KL / target - 1, -0.2, 0.2) * batch / horizon of itself (Ziegler et al.), and the
    summary's config records the horizon; the default, 256 samples, is short against a run."""
    assert cli.parse_args([]).kl_horizon == ppo.PPOConfig.kl_horizon == 256
    out = cli.main([*TINY, "--steps", "3", "--objectives", "sentiment,length", "--methods", "linear", "--seeds", "0",
                    "--kl-horizon", "16", "--out", str(tmp_path / "h")])
    cfg = out["config"]
    assert cfg["kl_horizon"] == 16
    beta = cfg["kl_coef"]
    hist = out["runs"][0]["history"]
    assert len(hist) == 3
    for h in hist:
        err = min(max(h["kl"] / cfg["target_kl"] - 1.0, -0.2), 0.2)
        beta *= 1.0 + err * cfg["batch"] / 16
        assert h["kl_coef"] == pytest.approx(beta, rel=1e-12)
    assert hist[-1]["kl_coef"] != pytest.approx(cfg["kl_coef"], rel=1e-3)  # 8 of 16 samples a rollout: it moved


# --------------------------------------------------------------------------- hypervolume
def test_point_hypervolume_and_reference():
    assert report.point_hv([0.5, 1.0, 0.8], [-1.0, 0.5, 0.0]) == pytest.approx(1.5 * 0.5 * 0.8)
    assert report.point_hv([0.5, 0.5, 0.8], [-1.0, 0.5, 0.0]) == 0.0  # at the floor of one objective
    assert report.point_hv([1.0] * 5, [0.0] * 5) is None
    runs = [{"evals": [{"rewards": [0.1, 2.0]}, {"rewards": [0.2, -1.0]}]}]
    ref = report.reference_point([0.0, None], runs, initial=[0.0, 1.0])
    assert ref[0] == 0.0 and ref[1] == pytest.approx(-1.0 - 0.3)


def test_seeds_ahead_counts_strict_wins_on_shared_seeds():
    """report.seeds_ahead: strictly above the baseline's run of the same seed, per objective and
    hypervolume; ties are not wins, a seed the baseline lacks is left out, a hypervolume the
    report could not compute (None) is no win."""
    def run(seed, rewards, hv):
        return {"seed": seed, "final": {"rewards": rewards, "hypervolume": hv}}

    base = {0: {"rewards": [0.5, 1.0], "hypervolume": 0.7}, 1: {"rewards": [0.2, 1.2], "hypervolume": None}}
    runs = [run(0, [0.6, 1.0], 0.8), run(1, [0.1, 1.3], 0.9), run(2, [0.9, 1.4], 1.5)]
    assert report.seeds_ahead(["sentiment", "length"], runs, base) == {
        "sentiment": 1, "length": 1, "hypervolume": 1, "of": 2}


# --------------------------------------------------------------------------- end to end
def _run(tmp_path, *extra):
    out = tmp_path / "results"
    summary = cli.main([*TINY, "--out", str(out), *extra])
    return out, summary


def test_demo_end_to_end(tmp_path, one_thread):
    methods = ["pama", "pama_token", "linear", "mgda_ub"]
    out, s = _run(tmp_path, "--seeds", "0,1", "--methods", ",".join(methods), "--micro-batches", "2")
    names = ["sentiment", "length", "diversity"]
    assert s["objectives"] == names
    for f in ["summary.json", "summary.csv", "train_curves.csv", "samples.jsonl", "samples.md"]:
        assert (out / f).stat().st_size > 0, f
    for f in ["reward_curves.png", "pareto_front.png"]:
        data = (out / f).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, f
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["objectives"] == names and set(on_disk["methods"]) == set(methods)
    assert on_disk["reference_point"] == [-1.0, 0.5, 0.0]
    assert len(s["runs"]) == len(methods) * 2
    for r in s["runs"]:
        assert [e["step"] for e in r["evals"]] == [0, 1, 2]
        assert r["evals"][0]["rewards"] == s["initial"]["rewards"]  # every run starts from the same policy
        for e in r["evals"]:
            want = math.prod(max(x - lo, 0.0) for x, lo in zip(e["rewards"], [-1.0, 0.5, 0.0]))
            assert e["hypervolume"] == pytest.approx(want)
            assert -1 <= e["rewards"][0] <= 1 and 0.5 <= e["rewards"][1] <= 1.5 and 0 <= e["rewards"][2] <= 1
        assert len(r["history"]) == 2
        assert r["history"][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is still the reference
        assert r["history"][1]["kl"] != 0.0  # then it has moved, and the KL penalty sees it
        for h in r["history"]:
            w = h["weights"]
            assert len(w) == 3 and sum(w) == pytest.approx(1.0, abs=1e-5) and min(w) >= -1e-7
            assert math.isfinite(h["kl"]) and math.isfinite(h["policy_loss"]) and math.isfinite(h["value_loss"])
        if r["method"] == "linear":
            assert all(h["weights"] == pytest.approx([1 / 3] * 3) for h in r["history"])
    # the same seed gives every method the same first rollout (same prompts, same samples)
    for seed in (0, 1):
        firsts = [r["history"][0]["rewards"] for r in s["runs"] if r["seed"] == seed]
        assert all(f == firsts[0] for f in firsts)
    for m in methods:
        info = s["methods"][m]
        assert sorted(info["seeds"]) == [0, 1]
        finals = [r["final"]["rewards"] for r in s["runs"] if r["method"] == m]
        for i, n in enumerate(names):
            assert info["median_final"][n] == pytest.approx(sorted(f[i] for f in finals)[0] / 2 + sorted(f[i] for f in finals)[1] / 2)
    # seed-level wins against linear, per objective and hypervolume, for every other method
    assert "seeds_ahead_of_linear" not in s["methods"]["linear"]
    lin = {r["seed"]: r["final"] for r in s["runs"] if r["method"] == "linear"}
    for m in methods:
        if m != "linear":
            mine = [r for r in s["runs"] if r["method"] == m]
            want = {n: sum(r["final"]["rewards"][i] > lin[r["seed"]]["rewards"][i] for r in mine) for i, n in enumerate(names)}
            want["hypervolume"] = sum(r["final"]["hypervolume"] > lin[r["seed"]]["hypervolume"] for r in mine)
            assert s["methods"][m]["seeds_ahead_of_linear"] == {**want, "of": 2}
    assert "seeds where the method ends strictly above linear" in report.table(s)
    assert s["pareto_front"]  # at least one run is non-dominated
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(methods) * 2 * 3 and set(rows[0]) == {"method", "seed", "step", *names, "hypervolume"}
    with (out / "train_curves.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(methods) * 2 * 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    _, held = corpus.prompts()
    assert len(samples) == len(methods) * 2 * len(held)
    assert all(set(x["rewards"]) == set(names) and x["prompt"] in held for x in samples)
    # the warmed-up initial policy is saved and loads as a --model directory
    saved = out / "initial_policy"
    assert transformers.AutoModelForCausalLM.from_pretrained(saved).config.vocab_size == len(corpus.vocabulary())


def test_demo_is_reproducible_and_independent_of_workers(tmp_path, one_thread):
    """A run depends on its method and seed only: not on the other runs, nor on whether it
    trains in this process or in a worker that loads the saved initial policy from disk."""
    _, a = _run(tmp_path / "a", "--seeds", "3", "--methods", "pama", "--workers", "1")
    _, b = _run(tmp_path / "b", "--seeds", "3", "--methods", "linear,pama", "--workers", "2")
    assert b["config"]["workers"] == 2
    ra = [r for r in a["runs"] if r["method"] == "pama"][0]
    rb = [r for r in b["runs"] if r["method"] == "pama"][0]
    assert ra["evals"] == rb["evals"] and ra["history"] == rb["history"]
    assert [r["method"] for r in b["runs"]] == ["linear", "pama"]


def _save_tiny_lm(path):
    model, tok = _tiny_policy(seed=5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _save_tiny_reward_model(path):
    tok = demo_policy.build_tokenizer()
    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=2, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(11)
    rm = transformers.GPT2ForSequenceClassification(cfg).eval()
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return rm, tok


def test_demo_loads_policy_and_reward_model_from_paths(tmp_path, one_thread):
    _save_tiny_lm(tmp_path / "lm")
    rm, tok = _save_tiny_reward_model(tmp_path / "rm")
    (tmp_path / "train.txt").write_text("the film\nthis movie was\ni thought the plot\n")
    (tmp_path / "eval.txt").write_text("the ending\noverall the cast\n")
    out, s = _run(
        tmp_path, "--model", str(tmp_path / "lm"), "--reward-model", str(tmp_path / "rm"),
        "--objectives", "sentiment,length", "--seeds", "0", "--methods", "pama,linear",
        "--prompts", str(tmp_path / "train.txt"), "--eval-prompts", str(tmp_path / "eval.txt"),
    )
    assert s["config"]["held_out_prompts"] == ["the ending", "overall the cast"]
    assert s["objectives"] == ["sentiment", "length", "reward_model"]  # --reward-model adds its objective
    assert s["config"]["model"] == str(tmp_path / "lm") and "warm_up" not in s["config"]
    assert not (out / "initial_policy").exists()  # nothing to save: the policy came from disk
    # the reward_model column is the last logit of the saved classifier on prompt + response
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 and {x["prompt"] for x in samples} == {"the ending", "overall the cast"}
    with torch.no_grad():
        for x in samples:
            enc = tok(f"{x['prompt']} {x['response']}", return_tensors="pt")
            want = float(rm(**enc).logits[0, 1])
            assert x["rewards"]["reward_model"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    # an unbounded objective's hypervolume reference lies below every evaluation
    ref = s["reference_point"][2]
    assert all(e["rewards"][2] > ref for r in s["runs"] for e in r["evals"])


def test_prompt_files(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(12)) + "\n\n")
    train, held = cli.load_prompts(str(f), None)
    assert held == ["prompt 4", "prompt 9"] and len(train) == 10 and not set(train) & set(held)
    g = tmp_path / "eval.txt"
    g.write_text("a\nb\n")
    assert cli.load_prompts(str(f), str(g)) == ([f"prompt {i}" for i in range(12)], ["a", "b"])
    assert cli.load_prompts(None, str(g)) == (corpus.prompts()[0], ["a", "b"])
    (tmp_path / "few.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="too few"):
        cli.load_prompts(str(tmp_path / "few.txt"), None)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        cli.load_prompts(str(tmp_path / "empty.txt"), None)
    with pytest.raises(FileNotFoundError, match="--eval-prompts"):
        cli.load_prompts(None, str(tmp_path / "missing.txt"))


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model"):
        cli.main([*TINY, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    for bad in (
        ["--methods", "pama,bogus"],
        ["--batch", "6", "--micro-batches", "4"],
        ["--steps", "0"],
        ["--seeds", "1,1"],
        ["--seeds", "a,b"],
        ["--warmup-steps", "-1"],
        ["--kl-horizon", "0"],
        ["--workers", "0"],
        ["--workers", "many"],
        ["--preferences", "auto", "--methods", "pama,mgda_ub"],  # mgda_ub takes no preference
        ["--preferences", "0.5,0.5;0.7"],  # 1 entry for 3 objectives
        ["--preferences", "1,0,0"],  # PAMA never trades an objective away
        ["--preferences", "a,b,c"],
    ):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    with pytest.raises(ValueError, match="unknown objective"):
        cli.main([*TINY, "--objectives", "sentiment,humour", "--out", str(tmp_path / "o2"), "--warmup-steps", "0"])


def test_demo_gae_whiten_scale(monkeypatch, tmp_path, one_thread):
    """GAE advantages before the Noon clamp: by default (and with --whiten scale) the loss sees
    scale_per_objective of the GAE advantages, not centred; --whiten centre whitens them;
    grpo (whose group mean is its baseline) refuses the option."""
    calls = {"whiten": [], "scale": []}
    real_whiten, real_scale = ppo.whiten_per_objective, ppo.scale_per_objective  # pama_ext.rl's, tested in test_gae

    def spy(name, real):
        def f(adv, mask, *a, **k):
            out = real(adv, mask, *a, **k)
            calls[name].append((adv.clone(), mask.clone(), out.clone()))
            return out
        return f

    monkeypatch.setattr(ppo, "whiten_per_objective", spy("whiten", real_whiten))
    monkeypatch.setattr(ppo, "scale_per_objective", spy("scale", real_scale))
    args = [*TINY, "--objectives", "sentiment,length", "--methods", "pama", "--seeds", "0"]
    default = cli.main([*args, "--out", str(tmp_path / "default")])
    assert default["config"]["whiten"] == "scale"
    assert not calls["whiten"] and len(calls["scale"]) == 2  # one normalisation per rollout
    for adv, mask, out in calls["scale"]:
        a, o = adv[mask].double(), out[mask].double()
        torch.testing.assert_close(o, a / a.std(0), rtol=1e-4, atol=1e-6)  # a positive multiple per column
        assert bool((a.mean(0).abs() > 1e-3).any())  # not centred: the mean survives
    explicit = cli.main([*args, "--whiten", "scale", "--out", str(tmp_path / "s")])
    assert len(calls["scale"]) == 4 and not calls["whiten"]
    assert explicit["config"]["whiten"] == "scale"
    cli.main([*args, "--whiten", "centre", "--out", str(tmp_path / "c")])
    assert len(calls["whiten"]) == 2 and len(calls["scale"]) == 4
    for adv, mask, out in calls["whiten"]:
        assert torch.allclose(out[mask].double().mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    with pytest.raises(SystemExit):
        cli.parse_args(["--estimator", "grpo", "--whiten", "scale"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--whiten", "median"])
    with pytest.raises(ValueError, match="whiten"):
        ppo.train("pama", 0, None, None, [], [], None, ppo.PPOConfig(whiten="median"), 1, 1, torch.device("cpu"))


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_fused_linear_demo_matches_unfused(tmp_path, one_thread, estimator):
    """``--fused-linear`` (log-probabilities and loss from the last hidden states and the LM
    head, chunk by chunk) trains the same runs as the unfused path, to float noise: the same
    rollouts, losses, weights and KL at every step, the same held-out rewards."""
    common = ["--seeds", "0", "--methods", "pama,pama_batch,linear,mgda_ub", "--estimator", estimator,
              "--micro-batches", "2"]
    if estimator == "grpo":
        common += ["--group-size", "4"]
    _, a = _run(tmp_path / "unfused", *common)
    _, b = _run(tmp_path / "fused", *common, "--fused-linear")
    assert b["config"]["ppo"]["fused_linear"] is True
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["method"] == rb["method"]
        for ha, hb in zip(ra["history"], rb["history"]):
            assert hb["rewards"] == ha["rewards"]  # the same samples: parameters differ by float noise only
            for key in ("policy_loss", "kl", "value_loss", "kl_loss"):
                if key in ha:
                    assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (ra["method"], key)
            assert hb["weights"] == pytest.approx(ha["weights"], abs=1e-5)
        for ea, eb in zip(ra["evals"], rb["evals"]):
            assert eb["rewards"] == pytest.approx(ea["rewards"], abs=1e-6)


def test_preference_fronts_and_consistency(tmp_path, one_thread):
    """``--preferences auto`` trains one run per preference for pama and linear and reports
    each traced front (hypervolume, rank correlations, wins); ``--consistency`` adds the
    reward-consistency variants, which train on the responses whose objectives agree."""
    out, s = _run(tmp_path, "--seeds", "0,1", "--objectives", "sentiment,length", "--preferences",
                  "0.2,0.8;1,1;0.8,0.2", "--consistency", "--steps", "1", "--eval-every", "1")
    prefs = ["0.2/0.8", "0.5/0.5", "0.8/0.2"]
    labels = [f"{m}@{p}{c}" for m in ("pama", "linear") for p in prefs for c in ("", "+consistency")]
    assert set(s["methods"]) == set(labels)
    assert {r["family"] for r in s["runs"]} == {"pama", "pama+consistency", "linear", "linear+consistency"}
    for r in s["runs"]:
        assert r["preference"] is not None and abs(sum(r["preference"]) - 1) < 1e-12
        assert ("consistency_kept" in r["history"][0]) == r["consistency"]
        if r["consistency"]:
            assert 0.0 <= r["history"][0]["consistency_kept"] <= 1.0
    fronts = s["fronts"]
    assert set(fronts) == {"pama", "pama+consistency", "linear", "linear+consistency"}
    for fam, f in fronts.items():
        assert list(f["median_points"]) == prefs[::-1]  # the first objective's share, largest first
        assert set(f["per_seed"]) == {0, 1}
        for v in f["per_seed"].values():
            assert v["front_hypervolume"] is not None and v["front_hypervolume"] >= 0
            assert all(r is None or -1 <= r <= 1 for r in v["spearman"])
    assert fronts["pama"]["seeds_compared"] == 2 and 0 <= fronts["pama"]["front_hv_wins_vs_linear"] <= 2
    data = (out / "pareto_front.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
