"""Tables, win counts and plots of the fidelity sweep (``benchmarks/fidelity.py``).

    python benchmarks/fidelity_report.py [--runs fidelity_runs]

Reads ``<runs>/<setting>/<method>/summary.json``; writes ``benchmarks/results/fidelity.json``
(every seed's final held-out rewards and hypervolume, medians, win counts),
``benchmarks/results/fidelity_*.png``, and the tables of ``benchmarks/FIDELITY.md`` (the
text between its ``fidelity-tables`` markers; the prose around them is kept).

A method "wins" a seed against ``linear`` (MORLHF) on a measure when its final held-out value
is strictly higher for that seed (every method trains from the same first rollout for a
seed). The default-choice rule of issue 12: a granularity qualifies when, in every
setting, its median is at least ``linear``'s on sentiment, on length and on hypervolume,
and its median hypervolume is above the initial policy's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["pama_token", "pama_token_veto", "pama_sequence", "pama_batch", "pama_sequence_gram", "pama_batch_mean", "linear", "noon_linear", "pama_token_signed", "pama_token_abstain", "mgda_ub"]
SETTING_TEXT = {  # the settings the default rule is judged on: the KL in the reward, as the spec puts it,
    # beta adapted within the run
    "gae_pair": "GAE (PPO), sentiment + length",
    "gae_three": "GAE (PPO), sentiment + length + diversity",
    "grpo_pair": "GRPO, sentiment + length",
    "grpo_three": "GRPO, sentiment + length + diversity",
}
FIXED_TEXT = {  # evidence for "The KL controller": the same with beta fixed at 0.2 in effect (horizon 10000)
    "gae_fixed_beta_pair": "GAE (PPO) with beta fixed in effect, sentiment + length",
    "gae_fixed_beta_three": "GAE (PPO) with beta fixed in effect, sentiment + length + diversity",
    "grpo_fixed_beta_pair": "GRPO with beta fixed in effect, sentiment + length",
    "grpo_fixed_beta_three": "GRPO with beta fixed in effect, sentiment + length + diversity",
}
KL_LOSS_TEXT = {  # evidence for the KL's placement: TRL's fixed k3 KL term in the loss instead
    "grpo_klloss_pair": "GRPO with the KL as a fixed loss term (k3, 0.04), sentiment + length",
    "grpo_klloss_three": "GRPO with the KL as a fixed loss term (k3, 0.04), sentiment + length + diversity",
}
SHARED_TEXT = {  # evidence for "The KL in every objective's reward": the KL added after the normalisation
    "grpo_shared_pair": "GRPO with the KL as one term after the group normalisation, beta fixed in effect, "
                        "sentiment + length",
    "grpo_shared_three": "GRPO with the KL as one term after the group normalisation, beta fixed in effect, "
                         "sentiment + length + diversity",
    "grpo_shared_adapt_pair": "GRPO with the KL as one term after the group normalisation, beta adapted within "
                              "the run, sentiment + length",
    "grpo_shared_adapt_three": "GRPO with the KL as one term after the group normalisation, beta adapted within "
                               "the run, sentiment + length + diversity",
}
CENTRE_TEXT = {  # evidence for "Centring before the clamp": GAE advantages centred and scaled (--whiten centre)
    "gae_centre_pair": "GAE (PPO) with the advantages centred and scaled, sentiment + length",
    "gae_centre_three": "GAE (PPO) with the advantages centred and scaled, sentiment + length + diversity",
}
EVIDENCE = [  # the settings not judged by the rule, each group under its heading on the page
    (FIXED_TEXT, "The same settings with beta fixed at 0.2 in effect (the controller's horizon at 10000 samples: "
                 "the judged form until \"The KL controller\"; evidence, not judged by the rule)"),
    (KL_LOSS_TEXT, "The same GRPO runs with TRL's KL placement (evidence for \"The KL budget\"; not judged "
                   "by the rule)"),
    (SHARED_TEXT, "The same GRPO settings with the KL as one term after each objective's normalisation (evidence "
                  "for \"The KL in every objective's reward\"; not judged by the rule)"),
    (CENTRE_TEXT, "The same GAE settings with each objective's advantages centred, then scaled (beta fixed in "
                  "effect; the judged form until \"Centring before the clamp\"; not judged by the rule)"),
]
ALL_TEXT = {**SETTING_TEXT, **FIXED_TEXT, **KL_LOSS_TEXT, **SHARED_TEXT, **CENTRE_TEXT}
PAIR = ("sentiment", "length")
START, END = "<!-- fidelity-tables:start -->", "<!-- fidelity-tables:end -->"


def load(runs: Path, previous: Path | None = None) -> dict:
    """Every setting found under ``runs``; a setting with no raw runs there is taken whole from
    ``previous`` (the committed ``results/fidelity.json``, which keeps every seed's final
    figures and the matched-KL table, not the curves), so one new setting can be added
    without rerunning the others."""
    data = {}
    prev = json.loads(previous.read_text())["settings"] if previous is not None and previous.is_file() else {}
    for setting in ALL_TEXT:
        sdir = runs / setting
        if not sdir.is_dir():
            continue
        entry = {"methods": {}}
        for mdir in sorted(sdir.iterdir()):
            f = mdir / "summary.json"
            if not f.is_file():
                continue
            s = json.loads(f.read_text())
            entry["objectives"] = s["objectives"]
            entry["initial"] = s["initial"]
            entry["command"] = s["config"].get("argv")
            # kl: the last training rollout's mean response KL to the reference (sum over tokens
            # of old_logp - ref_logp); curve: (KL, training rewards) of every rollout
            per_seed = {r["seed"]: {"rewards": r["final"]["rewards"], "hypervolume": r["final"]["hypervolume"],
                                    "kl": r["history"][-1]["kl"],
                                    # the summed KL grows with the answer: per token too
                                    "kl_per_token": r["history"][-1]["kl"] / max(r["history"][-1]["response_tokens"], 1.0),
                                    "curve": [(h["kl"], h["rewards"]) for h in r["history"]]}
                        for r in s["runs"]}
            # one method per invocation; the folder names it (pama_token_veto: the runs of
            # the token rule before exact zeros abstained, kept under another name)
            (info,) = s["methods"].values()
            entry["methods"][mdir.name] = {"per_seed": per_seed, "mean_weights": info["mean_weights"]}
        if entry["methods"]:
            data[setting] = entry
    for setting in ALL_TEXT:
        if setting not in data and setting in prev:
            e = prev[setting]  # JSON turned the seeds into strings: back to ints, as read from the runs
            methods = {m: {**i, "per_seed": {int(k): v for k, v in i["per_seed"].items()}} for m, i in e["methods"].items()}
            data[setting] = {**e, "methods": methods, "from": "results/fidelity.json"}
    return {s: data[s] for s in ALL_TEXT if s in data}


def analyse(data: dict) -> dict:
    for setting, e in data.items():
        names = e["objectives"]
        lin = e["methods"].get("linear")
        for m, info in e["methods"].items():
            seeds = sorted(info["per_seed"])
            cols = {n: [info["per_seed"][s]["rewards"][i] for s in seeds] for i, n in enumerate(names)}
            cols["hypervolume"] = [info["per_seed"][s]["hypervolume"] for s in seeds]
            info["seeds"] = seeds
            info["median"] = {k: statistics.median(v) for k, v in cols.items()}
            info["median_kl"] = statistics.median(info["per_seed"][s]["kl"] for s in seeds)
            if all("kl_per_token" in info["per_seed"][s] for s in seeds):  # not in the oldest settings' JSON
                info["median_kl_per_token"] = statistics.median(info["per_seed"][s]["kl_per_token"] for s in seeds)
            if lin is not None and m != "linear":
                common = [s for s in seeds if s in lin["per_seed"]]
                wins = {}
                for i, n in enumerate(names):
                    wins[n] = sum(info["per_seed"][s]["rewards"][i] > lin["per_seed"][s]["rewards"][i] for s in common)
                wins["hypervolume"] = sum(info["per_seed"][s]["hypervolume"] > lin["per_seed"][s]["hypervolume"] for s in common)
                info["wins_vs_linear"] = wins
                info["paired_seeds"] = len(common)
        if lin is not None:
            for m, info in e["methods"].items():
                med, lmed = info["median"], lin["median"]
                info["meets_rule"] = (all(med[n] >= lmed[n] for n in PAIR) and med["hypervolume"] >= lmed["hypervolume"]
                                      and med["hypervolume"] > e["initial"]["hypervolume"])
    judged = [s for s in data if s in SETTING_TEXT]
    rule = {m: rule_count(m, judged, data) for m in ORDER}
    for s in data:
        data[s]["at_matched_kl"] = matched_kl(data[s])
    return {"settings": data, "rule": rule}


def rule_count(method: str, settings: list, data: dict) -> dict:
    """In how many of ``settings`` that ran ``method`` it meets the default rule (as judged
    against each setting's own ``linear``): ``{"settings": ran, "meets_rule_in": met}``."""
    per = [data[s]["methods"][method].get("meets_rule") for s in settings if method in data[s]["methods"]]
    return {"settings": len(per), "meets_rule_in": sum(bool(x) for x in per)}


def rule_line(settings: list, data: dict) -> str:
    """One line: ``rule_count`` over ``settings`` for the methods run in more than one of them."""
    counts = []
    for m in ORDER:
        r = rule_count(m, settings, data)
        if r["settings"] > 1 and m != "linear":
            counts.append(f"`{m}` {r['meets_rule_in']} of {r['settings']}")
    return "The default rule in these settings: " + ", ".join(counts) + "." if counts else ""


def matched_kl(e: dict, method: str = "pama_token") -> dict | None:
    """Training rewards of ``method``'s last rollout against ``linear``'s at the first rollout
    where linear's KL reached ``method``'s final KL, per seed (medians over seeds): the two
    methods compared at the same distance from the reference, not at the same step."""
    lin, m = e["methods"].get("linear"), e["methods"].get(method)
    if lin is None or m is None:
        return None
    if any("curve" not in ps for x in (lin, m) for ps in x["per_seed"].values()):
        return e.get("at_matched_kl")  # a setting read back from the JSON: its table as computed then
    pairs = []
    for seed, info in m["per_seed"].items():
        if seed not in lin["per_seed"]:
            continue
        kl, rewards = info["curve"][-1]
        hit = [(k, r) for k, r in lin["per_seed"][seed]["curve"] if k >= kl]
        if hit:
            pairs.append((rewards, hit[0][1]))
    if not pairs:
        return None
    names = e["objectives"]
    return {"method": method, "seeds": len(pairs),
            "method_rewards": [statistics.median(p[0][i] for p in pairs) for i in range(len(names))],
            "linear_rewards": [statistics.median(p[1][i] for p in pairs) for i in range(len(names))],
            "method_wins": [sum(p[0][i] > p[1][i] for p in pairs) for i in range(len(names))]}


def table(setting: str, e: dict) -> str:
    names = e["objectives"]
    head = ["method", *names, "hypervolume", "wins vs linear (" + ", ".join([*names, "HV"]) + ")", "mean weights", "final KL"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    init = e["initial"]
    rows.append("| initial policy | " + " | ".join(f"{x:.3f}" for x in init["rewards"]) + f" | {init['hypervolume']:.3f} | | | |")
    best = {k: max(e["methods"][m]["median"][k] for m in e["methods"]) for k in [*names, "hypervolume"]}
    for m in [x for x in ORDER if x in e["methods"]] + [x for x in e["methods"] if x not in ORDER]:
        info = e["methods"][m]
        cells = []
        for k in [*names, "hypervolume"]:
            v = info["median"][k]
            cells.append(f"**{v:.3f}**" if v == best[k] else f"{v:.3f}")
        wins = info.get("wins_vs_linear")
        w = "" if wins is None else " / ".join(str(wins[k]) for k in [*names, "hypervolume"]) + f" of {info['paired_seeds']}"
        mw = "" if info["mean_weights"] is None else " / ".join(f"{x:.2f}" for x in info["mean_weights"])
        kpt = info.get("median_kl_per_token")
        kl = f"{info['median_kl']:.1f}" + ("" if kpt is None else f" ({kpt:.2f} a token)")
        rows.append(f"| `{m}` | " + " | ".join(cells) + f" | {w} | {mw} | {kl} |")
    return f"**{ALL_TEXT[setting]}** ({len(e['methods'][next(iter(e['methods']))]['seeds'])} seeds; medians of the held-out mean rewards)\n\n" + "\n".join(rows)


def plots(result: dict, outdir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in result["settings"] if s in SETTING_TEXT]
    paths = []
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        e = result["settings"][s]
        methods = [m for m in ORDER if m in e["methods"]]
        for j, m in enumerate(methods):
            hv = [v["hypervolume"] for v in e["methods"][m]["per_seed"].values()]
            ax.scatter([j] * len(hv), hv, s=12, alpha=0.6)
            ax.hlines(statistics.median(hv), j - 0.3, j + 0.3, color="k")
        ax.axhline(e["initial"]["hypervolume"], color="grey", ls="--", lw=1, label="initial policy")
        ax.set_xticks(range(len(methods)), [m.replace("pama_", "") for m in methods], rotation=45, ha="right")
        ax.set_title(SETTING_TEXT[s], fontsize=9)
        ax.set_ylabel("held-out hypervolume (seeds; bar = median)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = outdir / "fidelity_hypervolume.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        e = result["settings"][s]
        for m in [m for m in ORDER if m in e["methods"]]:
            pts = [v["rewards"][:2] for v in e["methods"][m]["per_seed"].values()]
            ax.scatter([p_[0] for p_ in pts], [p_[1] for p_ in pts], s=14, alpha=0.7, label=m)
        ax.scatter([e["initial"]["rewards"][0]], [e["initial"]["rewards"][1]], marker="*", s=120, c="k", label="initial")
        ax.set_xlabel("sentiment")
        ax.set_ylabel("length")
        ax.set_title(SETTING_TEXT[s], fontsize=9)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    p = outdir / "fidelity_sentiment_length.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def without_curves(result: dict) -> dict:
    """The result without each seed's per-rollout curve: the curves feed the matched-KL
    table only, and the JSON keeps the final figures (a tenth of the size)."""
    def seeds(per_seed):
        return {k: {f: v for f, v in ps.items() if f != "curve"} for k, ps in per_seed.items()}
    return {**result, "settings": {
        s: {**e, "methods": {m: {**i, "per_seed": seeds(i["per_seed"])} for m, i in e["methods"].items()}}
        for s, e in result["settings"].items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(ROOT / "fidelity_runs"))
    p.add_argument("--page", default=str(ROOT / "benchmarks" / "FIDELITY.md"))
    args = p.parse_args(argv)
    result = analyse(load(Path(args.runs), ROOT / "benchmarks" / "results" / "fidelity.json"))
    outdir = ROOT / "benchmarks" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "fidelity.json").write_text(json.dumps(without_curves(result), indent=1, sort_keys=True))
    plots(result, outdir)
    rule = "\n".join(f"| `{m}` | {r['meets_rule_in']} of {r['settings']} |" for m, r in result["rule"].items() if r["settings"])
    main_ = {s: e for s, e in result["settings"].items() if s in SETTING_TEXT}
    text = "\n\n".join(table(s, e) for s, e in main_.items())
    text += ("\n\nThe default rule (median at least `linear`'s on sentiment, length and hypervolume, and hypervolume "
             "above the initial policy's) in the four settings above, settings met:\n\n| method | settings |\n|---|---|\n" + rule)
    for texts, heading in EVIDENCE:
        group = [table(s, e) for s, e in result["settings"].items() if s in texts]
        if group:
            text += f"\n\n#### {heading}\n\n" + "\n\n".join(group)
            met = rule_line([s for s in result["settings"] if s in texts], result["settings"])
            if met:
                text += "\n\n" + met
    rows = []
    for s, e in result["settings"].items():
        mk = e.get("at_matched_kl")
        if mk:
            rows.append(f"| {ALL_TEXT[s]} | " + " / ".join(f"{x:.3f}" for x in mk["method_rewards"]) + " | "
                        + " / ".join(f"{x:.3f}" for x in mk["linear_rewards"]) + " | "
                        + " / ".join(str(x) for x in mk["method_wins"]) + f" of {mk['seeds']} |")
    if rows:
        text += ("\n\n**At the same KL.** `pama_token`'s training rewards on its last rollout against `linear`'s on the "
                 "first rollout where linear's KL reached `pama_token`'s final KL (medians over seeds; wins: seeds in "
                 "which `pama_token` is strictly higher; objectives in the order of the tables):\n\n"
                 "| setting | `pama_token` | `linear` at that KL | `pama_token` wins |\n|---|---|---|---|\n" + "\n".join(rows))
    page = Path(args.page)
    body = page.read_text() if page.is_file() else f"# Fidelity\n\n{START}\n{END}\n"
    if START not in body or END not in body:
        raise SystemExit(f"{page}: the markers {START} / {END} are missing")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(head + START + "\n" + text + "\n" + END + tail)
    print(text)


if __name__ == "__main__":
    main()
