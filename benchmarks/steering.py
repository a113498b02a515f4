"""Steerable PAMA against MORLHF's preference sweep (issue 13), and reward consistency sampling.

    .venv/bin/python benchmarks/steering.py            # runs what is missing, then writes the page
    .venv/bin/python benchmarks/steering.py --report   # the page from the runs already there

Runs the main job (``python -m pama_ext.examples.rlhf_demo``, its default PPO/GAE
settings) into ``steering_runs/`` (git-ignored):

* ``<set>_fronts``: ``--preferences auto --methods pama,linear`` over ``--seeds`` (5
  preferences for the pair, 7 for the three objectives), one run per preference, method and
  seed;
* ``<set>_consistency``: ``--consistency --methods pama,linear`` (uniform preference), each
  method with and without reward consistency sampling;

for the paper's pair (sentiment, length) and the demo's default three objectives. Then
writes ``benchmarks/STEERING.md`` (between its table markers), ``results/steering.json`` and
``results/steering_<set>.png`` (the traced fronts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from pama_ext.examples.rlhf_demo import report as report_mod

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = ROOT / "steering_runs"
SETS = {"pair": "sentiment,length", "three": "sentiment,length,diversity"}
START, END = "<!-- steering-tables:start -->", "<!-- steering-tables:end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--report", action="store_true", help="only write the page from existing runs")
    return p.parse_args(argv)


def run(name: str, objectives: str, seeds: str, extra) -> None:
    out = RUNS / name
    if (out / "summary.json").exists():
        print(f"{name}: done already ({out}/summary.json)")
        return
    cmd = [sys.executable, "-m", "pama_ext.examples.rlhf_demo", "--objectives", objectives, "--seeds", seeds,
           "--methods", "pama,linear", "--out", str(out), "--no-progress",
           # the study was run with the GAE advantages centred and the KL controller's horizon
           # at 10000 samples (beta fixed in effect), the demo's defaults until the fidelity
           # study ("Centring before the clamp", "The KL controller" in FIDELITY.md)
           "--whiten", "centre", "--kl-horizon", "10000", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def fronts_section(title: str, s: dict) -> list:
    names = s["objectives"]
    fronts = s["fronts"]
    lines = [f"**{title}** ({len(next(iter(fronts.values()))['per_seed'])} seeds; preferences "
             + "; ".join("/".join(f"{x:.2g}" for x in p) for p in next(iter(fronts.values()))["preferences"]) + ")", ""]
    lines.append("| method | median front HV | front HV wins vs linear | "
                 + " | ".join(f"median rho({n}) [seeds > 0]" for n in names) + " |")
    lines.append("|---|---|---|" + "---|" * len(names))
    for fam, f in fronts.items():
        wins = next((f"{v} / {f['seeds_compared']}" for k, v in f.items() if k.startswith("front_hv_wins_vs_")), "")
        rho = " | ".join(f"{_fmt(f['median_spearman'][n], '.2f')} [{f['positive_spearman_seeds'][n]}]" for n in names)
        lines.append(f"| `{fam}` | {_fmt(f['median_front_hypervolume'])} | {wins} | {rho} |")
    lines += ["", "Median final held-out point per preference:", ""]
    lines.append("| method | preference | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for fam, f in fronts.items():
        for key, pt in f["median_points"].items():
            lines.append(f"| `{fam}` | {key} | " + " | ".join(_fmt(x) for x in pt) + " |")
    return lines + [""]


def consistency_section(title: str, s: dict) -> list:
    names = s["objectives"]
    lines = [f"**{title}**, reward consistency sampling ({len(next(iter(s['methods'].values()))['seeds'])} seeds; "
             "uniform preference)", ""]
    lines.append("| method | " + " | ".join(names) + " | hypervolume | responses kept |")
    lines.append("|---|" + "---|" * (len(names) + 2))
    init = s["initial"]
    lines.append("| initial policy | " + " | ".join(_fmt(x) for x in init["rewards"]) + f" | {_fmt(init['hypervolume'])} | |")
    for m, info in s["methods"].items():
        kept = [h["consistency_kept"] for r in s["runs"] if r["method"] == m for h in r["history"] if "consistency_kept" in h]
        k = f"{statistics.fmean(kept):.2f}" if kept else "all"
        lines.append(f"| `{m}` | " + " | ".join(_fmt(info["median_final"][n]) for n in names)
                     + f" | {_fmt(info['median_hypervolume'])} | {k} |")
    return lines + [""]


def report() -> None:
    data, lines = {}, []
    for key, title in (("pair", "sentiment + length"), ("three", "sentiment + length + diversity")):
        f = RUNS / f"{key}_fronts" / "summary.json"
        c = RUNS / f"{key}_consistency" / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            data[f"{key}_fronts"] = {"objectives": s["objectives"], "fronts": s["fronts"], "initial": s["initial"],
                                     "config": {k: s["config"][k] for k in ("seeds", "steps", "estimator", "preference_list")}}
            lines += fronts_section(f"Fronts, {title}", s)
            report_mod.plot_fronts(HERE / "results" / f"steering_{key}.png", s)
        if c.exists():
            s = json.loads(c.read_text())
            data[f"{key}_consistency"] = {"objectives": s["objectives"], "methods": {
                m: {k: v for k, v in info.items() if k != "final"} for m, info in s["methods"].items()}}
            lines += consistency_section(f"Consistency, {title}", s)
    (HERE / "results" / "steering.json").write_text(json.dumps(data, indent=1) + "\n")
    page = HERE / "STEERING.md"
    text = page.read_text()
    a, b = text.index(START) + len(START), text.index(END)
    page.write_text(text[:a] + "\n" + "\n".join(lines) + text[b:])
    print(f"wrote {page} and {HERE / 'results' / 'steering.json'}")


def main(argv=None):
    args = parse_args(argv)
    if not args.report:
        for key, objectives in SETS.items():
            run(f"{key}_fronts", objectives, args.seeds, ["--preferences", "auto"])
            run(f"{key}_consistency", objectives, args.seeds, ["--consistency"])
    report()


if __name__ == "__main__":
    main()
