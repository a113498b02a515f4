"""Quickstart: multi-objective policy optimisation with PAMA against linear scalarisation.

    python -m pama_ext.examples.quickstart [--steps 60] [--seed 0] [--backend auto] [--out summary.json]

A tiny autoregressive policy (embedding + GRU over a 50-word vocabulary) answers random
3-word prompts with up to 12 words. Three programmatic rewards pull it apart:

* ``positive``: the fraction of the response's words that are in a short list of
  positive words (5 words, so a long all-positive answer must repeat itself);
* ``length``: ``clip(l / 6, 0.5, 1.5)``, the spec's length reward scaled to this toy
  (l = words before the end token);
* ``diversity``: distinct words / words (type-token ratio; short answers win it).

Each step samples one answer for each of 32 prompts, scores them, turns every objective's
rewards into sequence-level advantages whitened separately over the batch (the spec's
decision: before the Noon clamp, so reward scale does not decide the comparison), and takes
several PPO epochs on the batch. Two methods run from the same initial policy with the
same seeds and step budget:

* ``pama``: ``pama_ext.pama_loss(..., granularity="batch")``, Noon PPO with the min-norm
  weights of the batch's per-objective advantage vectors (printed each step, taken from
  ``pama_loss_and_stats``);
* ``linear``: MORLHF-style linear scalarisation, the uniform average of the whitened
  advantages with the standard signed PPO clip (written out below).

Before and after training the policies are scored on 256 answers sampled with a fixed
evaluation seed. On 2 CPU cores the default run takes about 5-10 s (one intra-op thread;
``--threads``).

What to expect (seed 0, 60 steps): the two methods end at different trade-offs, and
neither dominates the other. Linear scalarisation follows the two aligned objectives
(positive and long: positive ~0.99, length 1.5) and gives up diversity (0.80 -> 0.42).
PAMA with ``granularity="batch"`` puts most of its weight on diversity and ends with short,
non-repeating answers (diversity 1.0), and length falls to its floor. Two things drive this,
and the toy shows both plainly: the Noon clamp drops the negative part of each objective's
advantage, so nothing pushes back when answers get shorter; and with sequence-level
advantages broadcast over tokens, the batch Gram counts every token, so an objective whose
positive advantages sit on short answers has the smallest advantage vector and gets the
weight. Once every answer of a batch sits at the length floor, the length advantages are
all zero, the min-norm point is the zero vector (the batch is Pareto-stationary) and the
step's gradient is zero (only Adam's momentum still moves the policy); the log then shows
weights such as [0.00 0.50 0.50].
``--granularity token`` (or ``sequence``; the same here, since the advantages are per
sequence) reinforces only the answers above the batch mean on every objective at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import pama_ext

# --------------------------------------------------------------------------- the toy language
SPECIALS = ["<pad>", "<sep>", "<eos>"]
PAD, SEP, EOS = 0, 1, 2
POSITIVE_WORDS = ["good", "great", "happy", "love", "kind"]
OTHER_WORDS = (
    "the a cat dog runs sees house tree blue red day night walk talk book read city road water "
    "stone cloud rain sun moon bird fish green small big old new fast slow calm song door hill "
    "river light time sky wind"
).split()
VOCAB = SPECIALS + POSITIVE_WORDS + OTHER_WORDS  # 50 tokens
POSITIVE_IDS = frozenset(VOCAB.index(w) for w in POSITIVE_WORDS)
WORD_IDS = torch.arange(len(SPECIALS), len(VOCAB))
PROMPT_LEN = 3
MAX_LEN = 12  # response words, the end token included
OBJECTIVES = ("positive", "length", "diversity")
LENGTH_SCALE, LENGTH_LO, LENGTH_HI = 6.0, 0.5, 1.5
EVAL_SAMPLES = 256
EVAL_SEED_OFFSET = 10_000
CLIP_EPS = 0.2
METHODS = ("pama", "linear")


class Policy(nn.Module):
    """Embedding -> GRU -> next-token logits. <pad> and <sep> are never generated."""

    def __init__(self, vocab: int = len(VOCAB), emb: int = 32, hidden: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        with torch.no_grad():  # start talkative but short: ~20% chance to stop at each word
            self.head.bias[EOS] += 2.5
        banned = torch.zeros(vocab)
        banned[[PAD, SEP]] = -math.inf
        self.register_buffer("banned", banned)

    def forward(self, tokens: Tensor, h: Optional[Tensor] = None):
        out, h = self.gru(self.emb(tokens), h)
        return self.head(out) + self.banned, h


@torch.no_grad()
def sample(policy: Policy, prompts: Tensor, gen: torch.Generator):
    """Sample answers: (responses [B, MAX_LEN] with <eos> after the end, mask [B, MAX_LEN])."""
    b = prompts.shape[0]
    x = torch.cat([prompts, torch.full((b, 1), SEP)], dim=1)
    logits, h = policy(x)
    last = logits[:, -1]
    responses = torch.full((b, MAX_LEN), EOS)
    mask = torch.zeros(b, MAX_LEN, dtype=torch.bool)
    done = torch.zeros(b, dtype=torch.bool)
    for t in range(MAX_LEN):
        tok = torch.multinomial(torch.softmax(last, dim=-1), 1, generator=gen).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, EOS), tok)
        responses[:, t] = tok
        mask[:, t] = ~done
        done = done | (tok == EOS)
        if bool(done.all()):
            break
        logits, h = policy(tok[:, None], h)
        last = logits[:, -1]
    return responses, mask


def response_logp(policy: Policy, prompts: Tensor, responses: Tensor) -> Tensor:
    """log pi(response token | prefix) for every response position, [B, MAX_LEN]."""
    b = prompts.shape[0]
    x = torch.cat([prompts, torch.full((b, 1), SEP), responses[:, :-1]], dim=1)
    logits, _ = policy(x)
    logp = torch.log_softmax(logits[:, PROMPT_LEN:], dim=-1)
    return logp.gather(-1, responses[..., None]).squeeze(-1)


def rewards(responses: Tensor, mask: Tensor) -> Tensor:
    """[B, 3]: positive-word fraction, clipped length, type-token ratio (0 for empty answers)."""
    out = torch.zeros(responses.shape[0], len(OBJECTIVES))
    for i, (row, m) in enumerate(zip(responses.tolist(), mask.tolist())):
        words = [tok for tok, keep in zip(row, m) if keep and tok != EOS]
        n = len(words)
        out[i, 0] = sum(tok in POSITIVE_IDS for tok in words) / n if n else 0.0
        out[i, 1] = min(max(n / LENGTH_SCALE, LENGTH_LO), LENGTH_HI)
        out[i, 2] = len(set(words)) / n if n else 0.0
    return out


def whiten(r: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-objective whitening over the batch: every column to mean 0, std 1."""
    return (r - r.mean(0)) / (r.std(0) + eps)


def random_prompts(n: int, gen: torch.Generator) -> Tensor:
    return WORD_IDS[torch.randint(len(WORD_IDS), (n, PROMPT_LEN), generator=gen)]


# --------------------------------------------------------------------------- the two losses
def linear_ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = CLIP_EPS) -> Tensor:
    """MORLHF baseline: uniform linear scalarisation, standard (signed) PPO clip, token mean."""
    s = advantages.mean(-1, keepdim=True).expand_as(logp)  # [B, N] -> [B, T]
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * s, ratio.clamp(1 - clip_eps, 1 + clip_eps) * s)
    return -(surrogate * mask).sum() / mask.sum().clamp_min(1)


def pama_ppo_loss(logp, old_logp, advantages, mask, backend: str, granularity: str = "batch"):
    """Noon PPO on the PAMA-combined advantage; also returns the weights ([N], or the mean
    over sequences for ``sequence``, or None for ``token`` where they are per token)."""
    loss, info = pama_ext.pama_loss_and_stats(
        logp, old_logp, advantages, mask, clip_eps=CLIP_EPS, granularity=granularity, backend=backend
    )
    w = info.weights.detach()  # statistics, not part of the graph
    if granularity == "sequence":
        w = w[mask.any(1)].mean(0) if bool(mask.any()) else w.mean(0)
    elif granularity == "token":
        w = None
    return loss, w


def cpu_backend(backend: str) -> str:
    """The concrete backend that ``backend`` means for this example's CPU tensors (``auto``
    resolved as pama_ext resolves it: the highest-priority one that runs on CPU). Raises
    ValueError / RuntimeError when ``backend`` cannot run CPU tensors here."""
    x, adv, mask = torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool)
    candidates = pama_ext.available_backends() if backend == "auto" else [backend]
    for name in candidates:
        try:
            pama_ext.pama_loss(x, x, adv, mask, backend=name)
            return name
        except (ValueError, RuntimeError):
            if backend != "auto":
                raise
    return "torch"


# --------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(policy: Policy, seed: int, n: int = EVAL_SAMPLES) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    prompts = random_prompts(n, gen)
    responses, mask = sample(policy, prompts, gen)
    r = rewards(responses, mask).mean(0)
    return {name: float(v) for name, v in zip(OBJECTIVES, r)}


def train(method: str, args, log=print) -> dict:
    torch.manual_seed(args.seed)
    policy = Policy()
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    history: List[dict] = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        prompts = random_prompts(args.batch, gen)
        responses, mask = sample(policy, prompts, gen)
        r = rewards(responses, mask)
        adv = whiten(r)  # [B, N], sequence level: broadcast over each answer's tokens
        with torch.no_grad():
            old_logp = response_logp(policy, prompts, responses)
        weights = None
        for epoch in range(args.epochs):
            logp = response_logp(policy, prompts, responses)
            if method == "pama":
                loss, w = pama_ppo_loss(logp, old_logp, adv, mask, args.backend, args.granularity)
                if epoch == 0:
                    weights = [float(v) for v in w] if w is not None else None
            else:
                loss = linear_ppo_loss(logp, old_logp, adv, mask)
                weights = [1.0 / len(OBJECTIVES)] * len(OBJECTIVES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mean_r = {name: float(v) for name, v in zip(OBJECTIVES, r.mean(0))}
        history.append({"step": step, "reward": mean_r, "weights": weights, "loss": float(loss.detach())})
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            rs = "  ".join(f"{k} {v:.3f}" for k, v in mean_r.items())
            ws = "[" + " ".join(f"{w:.2f}" for w in weights) + "]" if weights is not None else "per token"
            log(f"[{method:6s}] step {step:3d}/{args.steps}  {rs}  weights {ws}")
    return {
        "history": history,
        "final": evaluate(policy, args.seed),
        "seconds": time.perf_counter() - t0,
    }


def format_table(initial: Dict[str, float], finals: Dict[str, Dict[str, float]]) -> str:
    head = f"{'policy':10s}" + "".join(f"{name:>11s}" for name in OBJECTIVES)
    lines = [head, "-" * len(head)]
    for name, rs in [("initial", initial), *finals.items()]:
        lines.append(f"{name:10s}" + "".join(f"{rs[o]:11.3f}" for o in OBJECTIVES))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(
        prog="python -m pama_ext.examples.quickstart",
        description="Tiny multi-objective policy optimisation: PAMA vs linear scalarisation.",
    )
    p.add_argument("--steps", type=int, default=60, help="policy updates per method (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial policy, prompts and sampling")
    p.add_argument(
        "--backend",
        default="auto",
        help="pama_ext backend for CPU tensors: auto (default), torch, cpp, ... (pama_ext.available_backends())",
    )
    p.add_argument("--out", default=None, help="write a JSON summary to this file")
    p.add_argument("--batch", type=int, default=32, help="prompts per step (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=5, help="print every k-th step (default: %(default)s)")
    p.add_argument(
        "--granularity",
        default="batch",
        choices=pama_ext.GRANULARITIES,
        help="where PAMA solves for the weights (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads while training (default: %(default)s; the tensors are tiny, "
        "so more threads only add synchronisation, and much of it when other jobs share the cores)",
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    try:
        args.backend_used = cpu_backend(args.backend)
    except (ValueError, RuntimeError) as exc:
        p.error(str(exc))
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run both methods; print the per-step log and the final table; return the summary
    (also written as JSON to ``--out``)."""
    args = parse_args(argv)
    backend_used = args.backend_used
    print(
        f"pama_ext {pama_ext.__version__}: backends {pama_ext.available_backends()}, using {backend_used!r}; "
        f"{args.steps} steps x {args.batch} prompts x {args.epochs} PPO epochs, "
        f"granularity {args.granularity!r}, seed {args.seed}"
    )
    print(
        f"objectives: positive (share of: {' '.join(POSITIVE_WORDS)}), "
        f"length clip(l/{LENGTH_SCALE:g}, {LENGTH_LO:g}, {LENGTH_HI:g}), diversity (distinct/words)"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        initial = evaluate(Policy(), args.seed)
        results = {method: train(method, args) for method in METHODS}
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    finals = {m: res["final"] for m, res in results.items()}
    print(f"\nmean reward of {EVAL_SAMPLES} answers sampled with evaluation seed {args.seed + EVAL_SEED_OFFSET}:")
    print(format_table(initial, finals))
    for m, res in results.items():
        ws = [h["weights"] for h in res["history"] if h["weights"] is not None]
        mean_w = [sum(col) / len(col) for col in zip(*ws)]
        change = ", ".join(f"{o} {res['final'][o] - initial[o]:+.3f}" for o in OBJECTIVES)
        w_txt = " ".join(f"{v:.2f}" for v in mean_w) if mean_w else "per token"
        print(f"{m:7s} {res['seconds']:5.1f} s  change vs initial: {change}  (mean weights {w_txt})")
    summary = {
        "config": {
            "steps": args.steps,
            "seed": args.seed,
            "backend": args.backend,
            "backend_used": backend_used,
            "granularity": args.granularity,
            "batch": args.batch,
            "epochs": args.epochs,
            "lr": args.lr,
            "clip_eps": CLIP_EPS,
            "max_len": MAX_LEN,
            "vocab_size": len(VOCAB),
            "eval_samples": EVAL_SAMPLES,
            "threads": max(1, args.threads),
        },
        "objectives": list(OBJECTIVES),
        "initial": initial,
        "methods": results,
        "seconds": seconds,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {out}")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
