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
SETTING_TEXT = {
    "gae_pair": "GAE (PPO), sentiment + length",
    "gae_three": "GAE (PPO), sentiment + length + diversity",
    "grpo_pair": "GRPO, sentiment + length",
    "grpo_three": "GRPO, sentiment + length + diversity",
}
PAIR = ("sentiment", "length")
START, END = "<!-- fidelity-tables:start -->", "<!-- fidelity-tables:end -->"


def load(runs: Path) -> dict:
    data = {}
    for setting in SETTING_TEXT:
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
            per_seed = {r["seed"]: {"rewards": r["final"]["rewards"], "hypervolume": r["final"]["hypervolume"]}
                        for r in s["runs"]}
            # one method per invocation; the folder names it (pama_token_veto: the runs of
            # the token rule before exact zeros abstained, kept under another name)
            (info,) = s["methods"].values()
            entry["methods"][mdir.name] = {"per_seed": per_seed, "mean_weights": info["mean_weights"]}
        if entry["methods"]:
            data[setting] = entry
    return data


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
    rule = {}
    for m in ORDER:
        per = [data[s]["methods"][m].get("meets_rule") for s in data if m in data[s]["methods"]]
        rule[m] = {"settings": len(per), "meets_rule_in": sum(bool(x) for x in per)}
    return {"settings": data, "rule": rule}


def table(setting: str, e: dict) -> str:
    names = e["objectives"]
    head = ["method", *names, "hypervolume", "wins vs linear (" + ", ".join([*names, "HV"]) + ")", "mean weights"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    init = e["initial"]
    rows.append("| initial policy | " + " | ".join(f"{x:.3f}" for x in init["rewards"]) + f" | {init['hypervolume']:.3f} | | |")
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
        rows.append(f"| `{m}` | " + " | ".join(cells) + f" | {w} | {mw} |")
    return f"**{SETTING_TEXT[setting]}** ({len(e['methods'][next(iter(e['methods']))]['seeds'])} seeds; medians of the held-out mean rewards)\n\n" + "\n".join(rows)


def plots(result: dict, outdir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["settings"])
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(ROOT / "fidelity_runs"))
    p.add_argument("--page", default=str(ROOT / "benchmarks" / "FIDELITY.md"))
    args = p.parse_args(argv)
    result = analyse(load(Path(args.runs)))
    outdir = ROOT / "benchmarks" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "fidelity.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    plots(result, outdir)
    rule = "\n".join(f"| `{m}` | {r['meets_rule_in']} of {r['settings']} |" for m, r in result["rule"].items() if r["settings"])
    text = "\n\n".join(table(s, e) for s, e in result["settings"].items())
    text += "\n\nThe default rule (median at least `linear`'s on sentiment, length and hypervolume, and hypervolume above the initial policy's), settings met:\n\n| method | settings |\n|---|---|\n" + rule
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
