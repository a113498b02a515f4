"""Why every method loses length under GRPO with three objectives (FIDELITY.md, "The KL in
every objective's reward").

Runs the main job's GRPO setting with the KL in every objective's reward (the spec's form)
and records, on every rollout, what ``group_advantages`` is given: each objective's score
and the KL term ``-beta KL_b`` that the demo adds to it. Reports, per objective, the median
within-group variance of the score beside that of the KL term, and the correlation of the
objective's group-normalised advantage with ``-KL_b`` (near 1: the objective's advantage
is in effect "stay close to the reference"), beside that of the score alone (the part of
the correlation the objective has of itself: long answers also cost more summed KL).

    python benchmarks/grpo_kl_diagnosis.py                       # grpo, three objectives, seeds 0-2
    python benchmarks/grpo_kl_diagnosis.py --objectives sentiment,length --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from pama_ext.examples.rlhf_demo import cli, ppo


def _record(log: list):
    """Wrap the demo's scorer and group normaliser so that each rollout's scores and the
    rewards built from them (scores - beta KL) are kept in ``log``."""
    score_all, group_advantages = ppo.score_all, ppo.group_advantages

    def scores_spy(*a, **k):
        s = score_all(*a, **k)
        log.append({"scores": s.detach().double().cpu()})
        return s

    def groups_spy(rewards, group_size, *a, **k):
        adv = group_advantages(rewards, group_size, *a, **k)
        log[-1].update(rewards=rewards.detach().double().cpu(), adv=adv.detach().double().cpu(), g=group_size)
        return adv

    def undo():
        ppo.score_all, ppo.group_advantages = score_all, group_advantages

    ppo.score_all, ppo.group_advantages = scores_spy, groups_spy
    return undo


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    d = (x.norm() * y.norm()).item()
    return float((x @ y).item() / d) if d > 0 else float("nan")


def summarise(log: list, names: list) -> dict:
    """Medians over rollouts: within-group variance of each score and of the KL term, and
    the correlation with -KL of each objective's advantage and of its score alone."""
    # held-out evaluation also scores, without a group; on a run's first rollout the policy
    # is the reference (KL 0 everywhere), which has no correlation to measure
    rows = [r for r in log if "rewards" in r and bool((r["rewards"] != r["scores"]).any())]
    per = {n: {"score_var": [], "kl_corr": [], "score_kl_corr": []} for n in names}
    kl_var = []
    for r in rows:
        g = r["g"]
        kl_term = (r["rewards"] - r["scores"])[:, 0]  # -beta KL_b, the same in every column
        if not torch.allclose(r["rewards"] - r["scores"], kl_term[:, None].expand_as(r["scores"]), atol=1e-5):
            raise RuntimeError("the demo's GRPO rewards are not score - beta KL in every objective's column")
        kl_var.append(kl_term.reshape(-1, g).var(dim=1).quantile(0.5).item())
        for i, n in enumerate(names):
            per[n]["score_var"].append(r["scores"][:, i].reshape(-1, g).var(dim=1).quantile(0.5).item())
            per[n]["kl_corr"].append(_corr(r["adv"][:, i], kl_term))
            per[n]["score_kl_corr"].append(_corr(r["scores"][:, i], kl_term))
    def med(values):  # a score constant over the batch has no correlation (NaN): left out
        finite = [v for v in values if math.isfinite(v)]
        return statistics.median(finite) if finite else float("nan")
    return {"rollouts": len(rows), "kl_term_group_var": med(kl_var),
            "objectives": {n: {k: med(v) for k, v in d.items()} for n, d in per.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", default="sentiment,length,diversity")
    p.add_argument("--methods", default="pama_token,linear")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder of the JSON")
    args, demo_args = p.parse_known_args(argv)  # anything else goes to the demo (e.g. --batch)
    names = args.objectives.split(",")
    out = {}
    for method in args.methods.split(","):
        log: list = []
        undo = _record(log)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                # beta fixed in effect (--kl-horizon 10000), as in the runs the committed results
                # diagnose (FIDELITY.md, "The KL controller"); a later --kl-horizon overrides it
                cli.main(["--estimator", "grpo", "--kl-penalty", "reward", "--kl-horizon", "10000",
                          "--objectives", args.objectives, "--methods", method, "--seeds", args.seeds,
                          "--steps", str(args.steps),
                          "--workers", "1", "--no-progress", "--out", tmp, *demo_args])
        finally:
            undo()
        out[method] = summarise(log, names)
    print(f"\nGRPO, KL in every objective's reward, objectives {args.objectives}, seeds {args.seeds}")
    print("medians over rollouts: within-group variance of each score (beside the KL term's), "
          "correlation with -KL of the objective's advantage and of its score")
    for method, s in out.items():
        print(f"{method}: KL term within-group variance {s['kl_term_group_var']:.4f}")
        for n, d in s["objectives"].items():
            print(f"  {n:10s} score variance {d['score_var']:.4f}  corr(advantage, -KL) {d['kl_corr']:+.2f}"
                  f"  corr(score, -KL) {d['score_kl_corr']:+.2f}")
    dest = Path(args.out) / f"grpo_kl_diagnosis_n{len(names)}.json"
    dest.write_text(json.dumps({"args": vars(args), "demo_args": demo_args, "methods": out}, indent=1))
    print(f"-> {dest}")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
