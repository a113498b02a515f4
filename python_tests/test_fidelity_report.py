"""benchmarks/fidelity_report.py: the committed results reproduce the page's tables and the
default rule, and new raw runs are merged with the settings kept in the JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fidelity.json"


def _bench(name: str):
    """benchmarks/<name>.py loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report():
    return _bench("fidelity_report")


def test_committed_results_reproduce_the_page(tmp_path):
    rep = _report()
    committed = json.loads(RESULTS.read_text())
    result = rep.analyse(rep.load(tmp_path, RESULTS))  # no raw runs: every setting from the JSON
    assert result["rule"] == committed["rule"]
    page = (ROOT / "benchmarks" / "FIDELITY.md").read_text()
    for setting, e in result["settings"].items():
        assert e["from"] == "results/fidelity.json"
        assert rep.table(setting, e) in page  # the tables on the page are the JSON's
        assert e["at_matched_kl"] == committed["settings"][setting]["at_matched_kl"]


def test_new_runs_join_the_kept_settings(tmp_path):
    """A setting found under --runs is read from its summaries; the others still come from the JSON."""
    rep = _report()
    committed = json.loads(RESULTS.read_text())
    setting = next(iter(committed["settings"]))
    kept = committed["settings"][setting]
    names = kept["objectives"]
    for method in ("linear", "pama_token"):
        runs = []
        for seed in (0, 1):
            base = 0.5 if method == "linear" else 0.6 + seed
            kl = 1.0 if method == "linear" else 1.0 + seed  # linear never reaches token's KL of seed 1
            hist = [{"kl": 0.0, "rewards": [0.0] * len(names), "response_tokens": 5.0},
                    {"kl": kl, "rewards": [base] * len(names), "response_tokens": 10.0}]
            runs.append({"seed": seed, "final": {"rewards": [base] * len(names), "hypervolume": base}, "history": hist})
        d = tmp_path / setting / method
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({
            "objectives": names, "initial": kept["initial"], "config": {"argv": ["x"]}, "runs": runs,
            "methods": {method: {"mean_weights": None}}}))
    data = rep.load(tmp_path, RESULTS)
    assert set(data) == set(committed["settings"])
    assert "from" not in data[setting] and set(data[setting]["methods"]) == {"linear", "pama_token"}
    result = rep.analyse(data)
    info = result["settings"][setting]["methods"]["pama_token"]
    assert info["wins_vs_linear"]["hypervolume"] == 2 and info["median"]["hypervolume"] == 1.1
    assert info["median_kl"] == 1.5 and info["median_kl_per_token"] == pytest.approx(0.15)  # final KL 1 and 2 over 10 tokens
    mk = result["settings"][setting]["at_matched_kl"]  # only seed 0 is matched
    assert mk["seeds"] == 1 and mk["method_rewards"] == [0.6] * len(names)
    others = [s for s in result["settings"] if s != setting]
    assert all(result["settings"][s]["from"] == "results/fidelity.json" for s in others)


def test_every_sweep_setting_is_a_valid_demo_command_and_has_a_page_title():
    """Each setting of benchmarks/fidelity.py parses as the demo's command line (so a rerun
    cannot fail on its arguments), has a title in the report, and the judged GAE settings
    scale their advantages without centring while the evidence settings centre them, and only
    the judged and the "adapt" settings let beta adapt within the run."""
    pytest.importorskip("transformers")
    pytest.importorskip("vaderSentiment")
    from pama_ext.examples.rlhf_demo import cli

    spec = importlib.util.spec_from_file_location("fidelity_sweep", ROOT / "benchmarks" / "fidelity.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rep = _report()
    settings = {**sweep.SETTINGS, **sweep.EXTRA_SETTINGS}
    assert set(sweep.SETTINGS) == set(rep.SETTING_TEXT) and set(settings) == set(rep.ALL_TEXT)
    for name, argv in settings.items():
        args = cli.parse_args([*argv, "--methods", ",".join(sweep.METHODS)])
        if args.estimator == "gae":
            assert args.whiten == ("centre" if name.startswith("gae_centre") else "scale"), name
        else:
            assert args.whiten is None, name
        # beta adapts within the run in the judged settings and the evidence that says so; the
        # evidence run before "The KL controller" keeps the horizon it was run with
        assert args.kl_horizon == (256 if name in sweep.SETTINGS or "adapt" in name else 10_000), name


def test_generalisation_check_samples_training_prompts_and_reads_the_final_rows(tmp_path):
    """benchmarks/fidelity_generalisation.py evaluates on a fixed sample of training prompts
    (never a held-out one, the same sample on every run) and reads each run's final figures
    and the initial policy's from the demo's summary.csv."""
    pytest.importorskip("transformers")
    from pama_ext.examples.rlhf_demo import corpus, cli

    gen = _bench("fidelity_generalisation")
    train, held = corpus.prompts()
    a = gen.training_prompt_sample(tmp_path / "a.txt").read_text().splitlines()
    b = gen.training_prompt_sample(tmp_path / "b.txt").read_text().splitlines()
    assert a == b and len(a) == len(set(a)) == 32
    assert set(a) <= set(train) and not set(a) & set(held)
    # the demo reads the file as its held-out set
    args = cli.parse_args(["--eval-prompts", str(tmp_path / "a.txt")])
    assert cli.load_prompts(args.prompts, args.eval_prompts) == (train, a)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.csv").write_text(
        "method,seed,step,sentiment,length,hypervolume\n"
        "linear,0,0,0.1,0.9,0.5\nlinear,0,40,0.6,1.2,1.1\nlinear,1,0,0.1,0.9,0.5\nlinear,1,40,0.4,1.4,1.0\n")
    rows = gen.final_rows(tmp_path / "run")
    assert rows == {-1: {"sentiment": 0.1, "length": 0.9, "hypervolume": 0.5},
                    0: {"sentiment": 0.6, "length": 1.2, "hypervolume": 1.1},
                    1: {"sentiment": 0.4, "length": 1.4, "hypervolume": 1.0}}
    assert set(gen.SETTINGS) >= {"gae_pair", "grpo_pair"}


def test_twenty_seed_check_reads_every_objective_and_applies_the_rule(tmp_path):
    """benchmarks/fidelity_seeds.py reads each run's final figures (every objective, the
    initial policy as seed -1) and applies FIDELITY.md's rule to a window of seeds: medians
    at least the baseline's on sentiment, length and hypervolume, median HV above the
    initial's; diversity is reported, not judged."""
    fs = _bench("fidelity_seeds")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.csv").write_text(
        "method,seed,step,sentiment,length,diversity,hypervolume\n"
        "linear,0,0,0.1,0.9,0.8,0.4\nlinear,0,40,0.6,1.2,0.9,1.1\nlinear,1,0,0.1,0.9,0.8,0.4\nlinear,1,40,0.4,1.4,0.7,1.0\n")
    assert fs.final_rows(tmp_path / "run") == {
        -1: {"sentiment": 0.1, "length": 0.9, "diversity": 0.8, "hypervolume": 0.4},
        0: {"sentiment": 0.6, "length": 1.2, "diversity": 0.9, "hypervolume": 1.1},
        1: {"sentiment": 0.4, "length": 1.4, "diversity": 0.7, "hypervolume": 1.0}}

    def rows(initial_hv, *per_seed):
        out = {-1: {"sentiment": 0.0, "length": 1.0, "diversity": 0.5, "hypervolume": initial_hv}}
        for s, (se, le, di, hv) in enumerate(per_seed):
            out[s] = {"sentiment": se, "length": le, "diversity": di, "hypervolume": hv}
        return out

    base = rows(0.5, (0.5, 1.0, 0.9, 1.0), (0.5, 1.0, 0.9, 1.0), (0.5, 1.0, 0.9, 1.0))
    tie = rows(0.5, (0.5, 1.2, 0.1, 1.2), (0.4, 1.2, 0.1, 1.2), (0.6, 1.2, 0.1, 1.2))
    v = fs.verdict(tie, base, (0, 1, 2))
    assert v["rule_holds"]  # a tied sentiment median meets "at least"; diversity is not judged
    assert v["default_ahead"] == {"sentiment": 1, "length": 3, "diversity": 0, "hypervolume": 3}
    assert v["median"]["default"]["sentiment"] == 0.5
    behind = rows(0.5, (0.4, 1.2, 0.9, 1.2), (0.4, 1.2, 0.9, 1.2), (0.6, 1.2, 0.9, 1.2))
    assert not fs.verdict(behind, base, (0, 1, 2))["rule_holds"]  # sentiment median 0.4 < 0.5
    below_initial = rows(1.3, (0.5, 1.2, 0.9, 1.2), (0.5, 1.2, 0.9, 1.2), (0.5, 1.2, 0.9, 1.2))
    assert not fs.verdict(below_initial, base, (0, 1, 2))["rule_holds"]  # HV 1.2 not above the initial 1.3
    assert fs.verdict(tie, base, (1,))["rule_holds"] is False  # one seed: 0.4 < 0.5
    assert set(fs.WINDOWS) == {"0-9", "10-19", "0-19"} and fs.WINDOWS["0-19"] == tuple(range(20))
