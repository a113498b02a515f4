"""The main job's preference sweeps (``--preferences``) and reward-consistency sampling
(``--consistency``): which runs to make, their labels, and the analysis of the fronts.

A run is a ``RunSpec``: a method, a seed, optionally a preference vector (``pama`` and
``linear`` take one: steerable PAMA and MORLHF) and the consistency flag. Its label
(``pama@0.9/0.1+consistency``) is the "method" the report groups seeds by. A *front* is one
method's final points over the preferences, for one seed. The analysis gives, per method:
the hypervolume of each seed's front (its non-dominated points), with win counts against
``linear``'s front of the same seed, and how monotonically the points follow the
preference: Spearman's rank correlation between ``p_i`` and the final reward of objective
i over the preferences.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from pama_ext.rl import hypervolume, non_dominated, reward_consistency_mask

#: methods that take a preference
STEERABLE_PREFIXES = ("pama", "linear")


def steerable(method: str) -> bool:
    return method == "linear" or method == "pama" or method.startswith("pama_") and method not in (
        "pama_token_signed", "pama_token_abstain")


def auto_preferences(n: int) -> List[Tuple[float, ...]]:
    """5 preferences for 2 objectives (0.1 .. 0.9); for N >= 3 the uniform one and, for each
    objective, 0.6 on it (the rest equal), then 0.4 on each pair (the rest equal)."""
    if n == 2:
        return [(0.1, 0.9), (0.3, 0.7), (0.5, 0.5), (0.7, 0.3), (0.9, 0.1)]
    out = [tuple([1.0 / n] * n)]
    for i in range(n):
        out.append(tuple(0.6 if j == i else 0.4 / (n - 1) for j in range(n)))
    if n == 3:
        for i in range(n):
            for j in range(i + 1, n):
                out.append(tuple(0.4 if k in (i, j) else 0.2 for k in range(n)))
    return out


def parse_preferences(text: str, n: int) -> List[Tuple[float, ...]]:
    """``auto`` or ``p1,p2,...;p1,p2,...`` (each vector > 0, normalised to sum 1)."""
    if text == "auto":
        return auto_preferences(n)
    prefs = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            p = [float(x) for x in part.split(",")]
        except ValueError as exc:
            raise ValueError(f"--preferences: {part!r} is not a comma-separated list of numbers") from exc
        if len(p) != n:
            raise ValueError(f"--preferences: {part!r} has {len(p)} entries for {n} objectives")
        if min(p) <= 0:
            raise ValueError(f"--preferences: {part!r} must be > 0 everywhere (PAMA never trades an objective away)")
        s = sum(p)
        prefs.append(tuple(x / s for x in p))
    if not prefs:
        raise ValueError("--preferences: no preference vector given")
    return prefs


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    preference: Optional[Tuple[float, ...]] = None
    consistency: bool = False

    @property
    def family(self) -> str:
        """The method without the preference: the curve a front is drawn along."""
        return self.method + ("+consistency" if self.consistency else "")

    @property
    def label(self) -> str:
        pref = "" if self.preference is None else "@" + "/".join(f"{x:.3g}" for x in self.preference)
        return self.method + pref + ("+consistency" if self.consistency else "")


def consistency_keep(scores: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    """Reward consistency sampling: bool [B], True for the responses whose scores agree
    across objectives: above the baseline on every objective, or below it on every one.
    The baseline is the response's group mean (GRPO) or the batch mean (GAE). Uses
    ``pama_ext.rl.reward_consistency_mask`` with the baseline as the other side of the pair."""
    b, n = scores.shape
    s = scores.to(torch.float64)
    if group_size:
        base = s.view(b // group_size, group_size, n).mean(1, keepdim=True).expand(-1, group_size, -1).reshape(b, n)
    else:
        base = s.mean(0, keepdim=True).expand(b, n)
    return reward_consistency_mask(s, base) | reward_consistency_mask(base, s)


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def front_hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> Optional[float]:
    if not points or len(ref) > 4:
        return None
    pts = torch.tensor([list(p) for p in points], dtype=torch.float64)
    keep = non_dominated(pts)
    return hypervolume(pts[keep], torch.tensor(list(ref), dtype=torch.float64))


def analyse_fronts(names: Sequence[str], ref: Sequence[float], runs: Sequence[dict]) -> Dict[str, dict]:
    """Per family (method + consistency flag) with preferences: the preferences, the median
    final point per preference, each seed's front hypervolume and rank correlations, their
    medians, and win counts of the front hypervolume against ``linear``'s (same seed)."""
    fams: Dict[str, Dict[int, Dict[Tuple[float, ...], List[float]]]] = {}
    for r in runs:
        if r.get("preference") is None:
            continue
        fam = r["family"]
        fams.setdefault(fam, {}).setdefault(r["seed"], {})[tuple(r["preference"])] = r["final"]["rewards"]
    out: Dict[str, dict] = {}
    for fam, seeds in fams.items():
        prefs = sorted({p for per in seeds.values() for p in per}, key=lambda p: tuple(-x for x in p))
        per_seed = {}
        for seed, pts in sorted(seeds.items()):
            have = [p for p in prefs if p in pts]
            rho = [spearman([p[i] for p in have], [pts[p][i] for p in have]) for i in range(len(names))]
            per_seed[seed] = {"front_hypervolume": front_hypervolume([pts[p] for p in have], ref), "spearman": rho}
        med_points = {
            "/".join(f"{x:.3g}" for x in p): [
                _median([seeds[s][p][i] for s in seeds if p in seeds[s]]) for i in range(len(names))
            ]
            for p in prefs
        }
        out[fam] = {
            "preferences": [list(p) for p in prefs],
            "median_points": med_points,
            "per_seed": per_seed,
            "median_front_hypervolume": _median([v["front_hypervolume"] for v in per_seed.values()]),
            "median_spearman": {n: _median([v["spearman"][i] for v in per_seed.values()]) for i, n in enumerate(names)},
            "positive_spearman_seeds": {
                n: sum(1 for v in per_seed.values() if (v["spearman"][i] or 0) > 0) for i, n in enumerate(names)
            },
        }
    for fam, info in out.items():
        base = "linear" + ("+consistency" if fam.endswith("+consistency") else "")
        if base in out and fam != base:
            lin = out[base]["per_seed"]
            pairs = [(v["front_hypervolume"], lin[s]["front_hypervolume"]) for s, v in info["per_seed"].items() if s in lin]
            info["front_hv_wins_vs_" + base] = sum(1 for a, b in pairs if a is not None and b is not None and a > b)
            info["seeds_compared"] = len(pairs)
    return out


def fronts_table(names: Sequence[str], fronts: Dict[str, dict]) -> str:
    head = f"{'method':22s}{'front HV':>10s}  " + "  ".join(f"rho({n[:10]})" for n in names) + "  wins vs linear"
    lines = [head, "-" * len(head)]
    for fam, f in fronts.items():
        hv = f["median_front_hypervolume"]
        rho = "  ".join(f"{'-' if f['median_spearman'][n] is None else format(f['median_spearman'][n], '.2f'):>{len(n[:10]) + 5}s}" for n in names)
        wins = next((f"{v}/{f['seeds_compared']}" for k, v in f.items() if k.startswith("front_hv_wins_vs_")), "")
        lines.append(f"{fam:22s}{'-' if hv is None else format(hv, '.4f'):>10s}  {rho}  {wins}")
    return "\n".join(lines)
