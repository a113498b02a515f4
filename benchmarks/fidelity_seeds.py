"""The default against MORLHF at twenty seeds: is each verdict of the rule stable (issue 12
evidence; benchmarks/FIDELITY.md, "Twenty seeds")?

The judged tables use seeds 0-9. This script runs the four judged settings of ``fidelity.py``
for the default ``pama_token`` and MORLHF ``linear`` over seeds 0-19 (``fidelity.py``'s
sweep, resumable), then applies the rule of FIDELITY.md to seeds 0-9, to the fresh seeds
10-19 and to all twenty: the default's median at least ``linear``'s on sentiment, on length
and on the hypervolume, and its median hypervolume above the initial policy's.

    python benchmarks/fidelity_seeds.py        # about 16 minutes on 2 idle cores

Writes ``benchmarks/results/fidelity_seeds.json`` (medians, seed-level wins, verdicts and
every seed's final held-out figures, with the machine they came from: runs reproduce bit for
bit on one machine, not across machines).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fidelity import ROOT, SETTINGS, final_rows, runs_and_out  # noqa: E402

METHODS = ("pama_token", "linear")
SEEDS = tuple(range(20))
WINDOWS = {"0-9": SEEDS[:10], "10-19": SEEDS[10:], "0-19": SEEDS}
JUDGED = ("sentiment", "length", "hypervolume")  # the rule's measures (diversity is reported)


def verdict(default: dict, baseline: dict, seeds) -> dict:
    """The rule on these seeds: medians, the seeds where the default is strictly ahead, and
    whether it holds (median at least the baseline's on each judged measure, median HV
    above the initial policy's)."""
    keys = [k for k in default[seeds[0]] if k in baseline[seeds[0]]]
    med = {m: {k: statistics.median(rows[s][k] for s in seeds) for k in keys}
           for m, rows in (("default", default), ("baseline", baseline))}
    ahead = {k: sum(default[s][k] > baseline[s][k] for s in seeds) for k in keys}
    holds = (all(med["default"][k] >= med["baseline"][k] for k in JUDGED)
             and med["default"]["hypervolume"] > default[-1]["hypervolume"])
    return {"seeds": len(seeds), "median": med, "default_ahead": ahead, "rule_holds": holds}


def main(argv=None) -> None:
    runs, out_json = runs_and_out(__doc__, "fidelity_runs_seeds", HERE / "results" / "fidelity_seeds.json", argv)
    subprocess.run([sys.executable, str(HERE / "fidelity.py"), "--settings", ",".join(SETTINGS), "--methods",
                    ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS)), "--runs", str(runs)], check=True, cwd=ROOT)
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor()},
           "seeds": list(SEEDS), "methods": {"default": METHODS[0], "baseline": METHODS[1]}, "settings": {}}
    for setting in SETTINGS:
        tok, lin = (final_rows(runs / setting / m) for m in METHODS)
        entry = {"initial": tok[-1], "windows": {w: verdict(tok, lin, s) for w, s in WINDOWS.items()},
                 "per_seed": {m: {str(s): rows[s] for s in SEEDS} for m, rows in zip(METHODS, (tok, lin))}}
        doc["settings"][setting] = entry
        for w, v in entry["windows"].items():
            d, b, a = v["median"]["default"], v["median"]["baseline"], v["default_ahead"]
            print(f"{setting:10s} seeds {w:5s} | pama_token " + " / ".join(f"{d[k]:.3f}" for k in d)
                  + " | linear " + " / ".join(f"{b[k]:.3f}" for k in b)
                  + " | ahead " + " / ".join(str(a[k]) for k in a) + f" of {v['seeds']}"
                  + f" | rule {'holds' if v['rule_holds'] else 'misses'}", flush=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
