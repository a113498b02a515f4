"""What the example writes: per-step curves (CSV), a summary (JSON + printed table) and a plot
of each objective's reward and weight over the steps, one line per method."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence


def curves(log_history: List[dict], names: Sequence[str]) -> List[dict]:
    """One row per logged step that has rewards: step, and reward/weight of each objective."""
    rows = []
    for h in log_history:
        if f"rewards/{names[0]}/mean" not in h:
            continue
        row = {"step": h["step"]}
        for n in names:
            row[f"{n}/reward"] = h[f"rewards/{n}/mean"]
            row[f"{n}/weight"] = h.get(f"objectives/{n}/weight")
        rows.append(row)
    return rows


def write_curves(path: Path, per_method: Dict[str, List[dict]]) -> None:
    fields = None
    with open(path, "w", newline="") as f:
        for method, rows in per_method.items():
            for row in rows:
                if fields is None:
                    fields = ["method", *row]
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                writer.writerow({"method": method, **row})


def summary(per_method: Dict[str, List[dict]], names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Mean reward and weight of each objective over the last quarter of the steps."""
    out = {}
    for method, rows in per_method.items():
        tail = rows[-max(1, len(rows) // 4) :]
        out[method] = {}
        for n in names:
            for key in ("reward", "weight"):
                vals = [r[f"{n}/{key}"] for r in tail if r[f"{n}/{key}"] is not None]
                out[method][f"{n}/{key}"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def table(summ: Dict[str, Dict[str, float]], names: Sequence[str]) -> str:
    head = "method    " + "".join(f"{n + ' (w)':>24}" for n in names)
    lines = [head, "-" * len(head)]
    for method, vals in summ.items():
        cells = "".join(f"{vals[n + '/reward']:>15.3f} ({vals[n + '/weight']:.2f})  " for n in names)
        lines.append(f"{method:<10}{cells}")
    return "\n".join(lines)


def plot(path: Path, per_method: Dict[str, List[dict]], names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6), sharex=True, squeeze=False)
    for j, n in enumerate(names):
        for method, rows in per_method.items():
            steps = [r["step"] for r in rows]
            axes[0][j].plot(steps, [r[f"{n}/reward"] for r in rows], label=method)
            axes[1][j].plot(steps, [r[f"{n}/weight"] for r in rows], label=method)
        axes[0][j].set_title(f"{n}: mean reward")
        axes[1][j].set_title(f"{n}: weight")
        axes[1][j].set_ylim(-0.05, 1.05)
        axes[1][j].set_xlabel("optimizer step")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(path: Path, summ: dict, config: dict) -> None:
    path.write_text(json.dumps({"config": config, "last_quarter_means": summ}, indent=2))
