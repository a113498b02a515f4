"""The demo's results folder: summary (JSON + CSV), reward curves and Pareto front (PNG),
sample generations, and the table printed at the end.

Hypervolume: of the point of held-out mean rewards (one point per method, seed and step),
with respect to the reference point made of every objective's lower bound (``Objective.lower``:
sentiment -1, length lo, diversity 0, conciseness 0); for an unbounded objective (a reward
model) the lowest mean any evaluation reached, less a tenth of the spread. The
hypervolume of a single point is the volume of the box between it and the reference, so it
rewards progress on every objective at once and is 0 when any objective sits at its floor.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from pama_ext.rl import hypervolume, non_dominated

MAX_HV_OBJECTIVES = 4  # pama_ext.rl.hypervolume is exact for 1..4 objectives


def reference_point(lowers: Sequence[Optional[float]], runs: Sequence[dict], initial: Sequence[float]) -> List[float]:
    ref = []
    for i, lo in enumerate(lowers):
        if lo is not None:
            ref.append(float(lo))
            continue
        seen = [float(initial[i])] + [e["rewards"][i] for r in runs for e in r["evals"]]
        ref.append(min(seen) - 0.1 * (max(seen) - min(seen) + 1e-12))
    return ref


def point_hv(point: Sequence[float], ref: Sequence[float]) -> Optional[float]:
    if len(point) > MAX_HV_OBJECTIVES:
        return None
    return hypervolume(torch.tensor([list(point)], dtype=torch.float64), torch.tensor(ref, dtype=torch.float64))


def _median(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def seeds_ahead(names: Sequence[str], runs: Sequence[dict], base: Dict[int, dict]) -> dict:
    """Per objective and for the hypervolume: the seeds whose final held-out value is strictly
    above the baseline run's of the same seed; "of": the seeds both have."""
    both = [r for r in runs if r["seed"] in base]
    out = {n: sum(r["final"]["rewards"][i] > base[r["seed"]]["rewards"][i] for r in both) for i, n in enumerate(names)}
    out["hypervolume"] = sum(
        r["final"]["hypervolume"] is not None and base[r["seed"]]["hypervolume"] is not None
        and r["final"]["hypervolume"] > base[r["seed"]]["hypervolume"] for r in both)
    out["of"] = len(both)
    return out


def summarize(names: Sequence[str], lowers, initial: Sequence[float], runs: Sequence[dict], config: dict) -> dict:
    """The summary dict written as summary.json (every number the plots and the table use)."""
    ref = reference_point(lowers, runs, initial)
    for r in runs:
        for e in r["evals"]:
            e["hypervolume"] = point_hv(e["rewards"], ref)
        r["final"] = r["evals"][-1]
    methods: Dict[str, dict] = {}
    for r in runs:
        methods.setdefault(r["method"], {"seeds": [], "final": [], "hypervolume": []})
        m = methods[r["method"]]
        m["seeds"].append(r["seed"])
        m["final"].append(r["final"]["rewards"])
        m["hypervolume"].append(r["final"]["hypervolume"])
    for name, m in methods.items():
        m["median_final"] = {n: _median([f[i] for f in m["final"]]) for i, n in enumerate(names)}
        m["median_hypervolume"] = _median(m["hypervolume"])
        ws = [h["weights"] for r in runs if r["method"] == name for h in r["history"]]
        m["mean_weights"] = [sum(c) / len(c) for c in zip(*ws)] if ws else None
    if "linear" in methods:  # seed-level wins against MORLHF, the measure benchmarks/FIDELITY.md uses
        base = {r["seed"]: r["final"] for r in runs if r["method"] == "linear"}
        for name, m in methods.items():
            if name != "linear":
                m["seeds_ahead_of_linear"] = seeds_ahead(names, [r for r in runs if r["method"] == name], base)
    finals = [r["final"]["rewards"] for r in runs]
    front = non_dominated(torch.tensor(finals, dtype=torch.float64)).tolist() if finals else []
    return {
        "objectives": list(names),
        "reference_point": ref,
        "initial": {"rewards": list(initial), "hypervolume": point_hv(initial, ref)},
        "methods": methods,
        "pareto_front": [
            {"method": runs[i]["method"], "seed": runs[i]["seed"], "rewards": finals[i]}
            for i, keep in enumerate(front)
            if keep
        ],
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
        "config": config,
    }


def write_csv(path: Path, summary: dict) -> None:
    """One row per method, seed and evaluation step: held-out mean rewards and hypervolume."""
    names = summary["objectives"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", *names, "hypervolume"])
        for r in summary["runs"]:
            for e in r["evals"]:
                hv = e["hypervolume"]
                w.writerow([r["method"], r["seed"], e["step"], *[f"{x:.6f}" for x in e["rewards"]], "" if hv is None else f"{hv:.6f}"])


def write_train_csv(path: Path, summary: dict) -> None:
    """One row per method, seed and training step: rollout mean rewards, weights, KL."""
    names = summary["objectives"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", *names, *[f"weight_{n}" for n in names], "kl", "kl_coef"])
        for r in summary["runs"]:
            for h in r["history"]:
                w.writerow(
                    [r["method"], r["seed"], h["step"], *[f"{x:.6f}" for x in h["rewards"]],
                     *[f"{x:.6f}" for x in h["weights"]], f"{h['kl']:.6f}", f"{h['kl_coef']:.6f}"]
                )


def write_samples(path_jsonl: Path, path_md: Path, runs: Sequence[dict], per_method: int = 8) -> None:
    with path_jsonl.open("w") as f:
        for r in runs:
            for s in r["samples"]:
                f.write(json.dumps({"method": r["method"], "seed": r["seed"], **s}) + "\n")
    lines = ["# Sample generations on held-out prompts (final policies, first seed)", ""]
    seen = set()
    for r in runs:
        if r["method"] in seen:
            continue
        seen.add(r["method"])
        lines += [f"## {r['method']} (seed {r['seed']})", "", "| prompt | response | rewards |", "|---|---|---|"]
        for s in r["samples"][:: max(1, len(r["samples"]) // per_method)][:per_method]:
            rw = ", ".join(f"{k} {v:.2f}" for k, v in s["rewards"].items())
            lines.append(f"| {s['prompt']} | {s['response'].replace('|', '/')} | {rw} |")
        lines.append("")
    path_md.write_text("\n".join(lines))


def _colors(methods: Sequence[str]) -> Dict[str, str]:
    palette = ["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def plot_curves(path: Path, summary: dict) -> None:
    """Per-objective rollout reward per step (median over seeds, band = min..max), held-out
    evaluations as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["objectives"]
    methods = list(summary["methods"])
    colors = _colors(methods)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        for m in methods:
            runs = [r for r in summary["runs"] if r["method"] == m]
            steps = [h["step"] for h in runs[0]["history"]]
            ys = [[r["history"][k]["rewards"][i] for r in runs] for k in range(len(steps))]
            ax.plot(steps, [statistics.median(y) for y in ys], color=colors[m], label=m)
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colors[m], alpha=0.15)
            ev_steps = [e["step"] for e in runs[0]["evals"]]
            ev = [statistics.median(r["evals"][k]["rewards"][i] for r in runs) for k in range(len(ev_steps))]
            ax.plot(ev_steps, ev, "o", color=colors[m], markersize=4, markeredgecolor="black", markeredgewidth=0.5)
        ax.set_title(name)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean reward (line: rollouts, dots: held-out)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_front(path: Path, summary: dict) -> None:
    """Final held-out mean rewards of every method and seed, one panel per pair of objectives;
    the points on the Pareto front of all runs (over all N objectives) are ringed. With
    preference sweeps (``summary["fronts"]``): each method's traced front instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if summary.get("fronts"):
        return plot_fronts(path, summary)

    names = summary["objectives"]
    methods = list(summary["methods"])
    colors = _colors(methods)
    n = len(names)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)] or [(0, 0)]
    front = {(p["method"], p["seed"]) for p in summary["pareto_front"]}
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.4 * len(pairs), 4.0), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        init = summary["initial"]["rewards"]
        ax.plot(init[a], init[b], "k*", markersize=11, label="initial policy")
        for m in methods:
            info = summary["methods"][m]
            hv = info["median_hypervolume"]
            label = f"{m} (median HV {hv:.3f})" if hv is not None else m
            pts = [r for r in summary["runs"] if r["method"] == m]
            xs = [r["final"]["rewards"][a] for r in pts]
            ys = [r["final"]["rewards"][b] for r in pts]
            ax.scatter(xs, ys, color=colors[m], s=36, label=label, zorder=3)
            for r in pts:
                if (r["method"], r["seed"]) in front:
                    ax.scatter([r["final"]["rewards"][a]], [r["final"]["rewards"][b]], s=140, facecolors="none",
                               edgecolors="black", linewidths=1.0, zorder=2)
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("final held-out mean rewards per method and seed (ringed: on the Pareto front of all runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fronts(path: Path, summary: dict) -> None:
    """Each method's front traced by the preferences: the median final point (over seeds) of
    every preference, joined in preference order and labelled with it; one panel per pair
    of objectives; the legend gives the median front hypervolume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["objectives"]
    fronts = summary["fronts"]
    colors = _colors(list(fronts))
    n = len(names)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)] or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.8 * len(pairs), 4.4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        init = summary["initial"]["rewards"]
        ax.plot(init[a], init[b], "k*", markersize=11, label="initial policy")
        for fam, f in fronts.items():
            pts = f["median_points"]
            xs = [p[a] for p in pts.values()]
            ys = [p[b] for p in pts.values()]
            hv = f["median_front_hypervolume"]
            ax.plot(xs, ys, "o-", color=colors[fam], markersize=5,
                    label=f"{fam} (median front HV {hv:.3f})" if hv is not None else fam)
            for key, p in pts.items():
                ax.annotate(key, (p[a], p[b]), fontsize=6, color=colors[fam], xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("fronts traced with the preferences\nmedian final held-out point per preference\n"
                 "label: preference " + "/".join(names), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    """Median over seeds of the final held-out rewards and hypervolume, per method."""
    names = summary["objectives"]
    w = max([12] + [len(m) + 1 for m in summary["methods"]])
    head = f"{'method':{w}s}" + "".join(f"{n:>13s}" for n in names) + f"{'hypervolume':>13s}  seeds"
    lines = [head, "-" * len(head)]
    init = summary["initial"]
    hv = init["hypervolume"]
    lines.append(f"{'initial':{w}s}" + "".join(f"{x:13.3f}" for x in init["rewards"]) + (f"{hv:13.4f}" if hv is not None else f"{'-':>13s}"))
    for m, info in summary["methods"].items():
        med = info["median_final"]
        hv = info["median_hypervolume"]
        lines.append(
            f"{m:{w}s}" + "".join(f"{med[n]:13.3f}" for n in names) + (f"{hv:13.4f}" if hv is not None else f"{'-':>13s}")
            + f"  {len(info['seeds'])}"
        )
    ahead = [(m, info["seeds_ahead_of_linear"]) for m, info in summary["methods"].items() if "seeds_ahead_of_linear" in info]
    if ahead:  # a median over few seeds can hide which way the seeds went
        lines.append("")
        lines.append("seeds where the method ends strictly above linear (same seed):")
        for m, a in ahead:
            lines.append(f"{m:{w}s}" + "".join(f"{a[n]:13d}" for n in names) + f"{a['hypervolume']:13d}  of {a['of']}")
    return "\n".join(lines)


def write_all(out: Path, summary: dict, runs: Sequence[dict]) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary_json": out / "summary.json",
        "summary_csv": out / "summary.csv",
        "train_csv": out / "train_curves.csv",
        "curves_png": out / "reward_curves.png",
        "front_png": out / "pareto_front.png",
        "samples_jsonl": out / "samples.jsonl",
        "samples_md": out / "samples.md",
    }
    paths["summary_json"].write_text(json.dumps(summary, indent=1) + "\n")
    write_csv(paths["summary_csv"], summary)
    write_train_csv(paths["train_csv"], summary)
    write_samples(paths["samples_jsonl"], paths["samples_md"], runs)
    plot_curves(paths["curves_png"], summary)
    plot_front(paths["front_png"], summary)
    return paths
