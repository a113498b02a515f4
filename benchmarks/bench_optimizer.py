"""CPU benchmark of one PPO optimizer step through ``pama_ext.PAMA`` against single-objective Noon PPO.

Run the interleaved timing and print / save the ratio table
(``benchmarks/results/optimizer.json``; see ``benchmarks/OPTIMIZER.md``)::

    .venv/bin/python benchmarks/bench_optimizer.py [--rounds 15] [--n 2 4] [--threads 2]

on a GPU, GPT-2 small's shape (124 M parameters, B = 16, T = 512; wall-time ratios are the
figures there, CPU time means nothing for GPU work)::

    python benchmarks/bench_optimizer.py --device cuda --model gpt2 --methods noon pama pama_accum_fwd linear

or the same steps as pytest-benchmark cases::

    .venv/bin/python -m pytest benchmarks/bench_optimizer.py --benchmark-only

One timed step, the same for every method, on the same GPT-2 policy (``transformers``
``GPT2LMHeadModel`` built from a config: 4 layers, d = 256, vocabulary 8192, about 5.3 M
parameters, dropout 0) and the same minibatch (B = 8 sequences of T = 64 tokens, the last
32 to 48 of each a ragged response)::

    logp = log_softmax(policy(tokens).logits).gather(...)   # forward
    loss = <method>(logp, old_logp, advantages, mask)
    opt.zero_grad(); loss.backward(); opt.step()             # AdamW

Methods:

* ``noon``: the baseline, single-objective Noon PPO written as PPO code writes it
  (``-min(u A, clip(u) A)`` with ``A = max(A', 0)``, token mean), plain ``AdamW``.
* ``pama``: ``PAMA(AdamW, N).loss`` (granularity ``batch``, the fused C++ op) + ``PAMA.step``.
* ``pama_accum``: the gradient-accumulation path with the statistics taken from ``old_logp``
  (the first-epoch shortcut: no extra forward): ``accumulate`` + ``solve`` + the
  fixed-weights loss.
* ``pama_accum_fwd``: the same with the statistics from an extra no-grad forward (what a
  later PPO epoch, where ``logp != old_logp``, needs).
* ``linear``: ``PAMA(..., combiner="linear")`` (MORLHF, signed PPO clip).
* ``mgda_ub``: ``combiner="mgda_ub"`` with ``shared`` = the last hidden states.
* ``mgda``: ``combiner="mgda"``: N per-objective backward passes over all parameters + 1.

A second measurement isolates what PAMA adds: the loss alone, forward + backward from a
leaf ``logp`` (``loss_only``: ``noon``, ``pama``, ``pama_accum``, ``linear``), many calls per
round. The step overhead it implies, ``(loss_pama - loss_noon) / step_noon``, is far less
noisy on a shared machine than the difference of two whole-step timings.

Rounds are interleaved (every method once per round, in a rotating order) so that load
from other jobs spreads over all methods. Each round records wall time and the process's
CPU time (``time.process_time``). With ``--threads 1`` the CPU time is the work done and
hardly depends on what else runs on the machine, so the ratios of CPU times are the robust
figures on a shared machine; wall-time ratios are reported too. Ratios use the fastest round
of each method (``min``) and also the medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

import pama_ext

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "optimizer.json"
CFG = dict(vocab_size=8192, n_positions=64, n_embd=256, n_layer=4, n_head=4)
B, T, PROMPT = 8, 64, 16
# --model: the policy and minibatch (B, T, PROMPT) of a run. "small" is the CPU default;
# "gpt2" is GPT-2 small's shape (124 M parameters) with a GPU-sized minibatch, for --device cuda.
MODELS = {
    "small": (dict(vocab_size=8192, n_positions=64, n_embd=256, n_layer=4, n_head=4), (8, 64, 16)),
    "gpt2": (dict(vocab_size=50257, n_positions=512, n_embd=768, n_layer=12, n_head=12), (16, 512, 128)),
    "tiny": (dict(vocab_size=512, n_positions=32, n_embd=32, n_layer=1, n_head=2), (2, 32, 8)),
}
DEVICE = torch.device("cpu")
CLIP_EPS = 0.2
METHODS = ("noon", "pama", "pama_accum", "pama_accum_fwd", "linear", "mgda_ub", "mgda")

if os.environ.get("PAMA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PAMA_BENCH_THREADS"]))


def configure(model: str = "small", device: str = "cpu") -> None:
    """Select the policy / minibatch shape and the device of this run (module globals, so
    the pytest-benchmark cases keep the CPU defaults)."""
    global CFG, B, T, PROMPT, DEVICE
    CFG, (B, T, PROMPT) = dict(MODELS[model][0]), MODELS[model][1]
    DEVICE = torch.device(device)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_policy():
    import transformers

    cfg = transformers.GPT2Config(**CFG, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE)


def make_batch(n: int):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    lengths = torch.randint(T - PROMPT - 16, T - PROMPT + 1, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    mask = (pos >= PROMPT) & (pos < PROMPT + lengths[:, None])
    adv = torch.randn(B, T, n, generator=g) + torch.linspace(-0.3, 0.3, n)
    return tokens.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE)


def forward(policy, tokens, hidden: bool = False):
    out = policy(input_ids=tokens, output_hidden_states=hidden)
    logits = out.logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    logp = torch.nn.functional.pad(logp, (1, 0))  # position 0 (a prompt token) is never masked
    return logp, (out.hidden_states[-1] if hidden else None)


def noon_ppo_loss(logp, old_logp, adv, mask, clip_eps=CLIP_EPS):
    """Single-objective Noon PPO, as a PPO trainer writes it."""
    a = adv.clamp_min(0)
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    m = mask.to(per_tok.dtype)
    return (per_tok * m).sum() / m.sum().clamp_min(1)


class Runner:
    """One method: its own copy of the policy and optimizer; ``step()`` is one timed PPO step."""

    def __init__(self, method: str, n: int, policy, tokens, adv, mask, old_logp):
        self.method, self.n = method, n
        self.policy = copy.deepcopy(policy)
        self.tokens, self.adv, self.mask, self.old_logp = tokens, adv, mask, old_logp
        base = torch.optim.AdamW(self.policy.parameters(), lr=1e-6)
        if method == "noon":
            self.opt = base
            self.adv1 = adv[..., 0].contiguous()
        else:
            combiner = method if method in pama_ext.COMBINERS else "pama"
            self.opt = pama_ext.PAMA(base, n, combiner=combiner, clip_eps=CLIP_EPS)

    def step(self):
        hidden = self.method == "mgda_ub"
        if self.method == "pama_accum":
            self.opt.accumulate(self.old_logp, self.old_logp, self.adv, self.mask)
            self.opt.solve()
        elif self.method == "pama_accum_fwd":
            with torch.no_grad():
                self.opt.accumulate(forward(self.policy, self.tokens)[0], self.old_logp, self.adv, self.mask)
            self.opt.solve()
        logp, h = forward(self.policy, self.tokens, hidden)
        if self.method == "noon":
            loss = noon_ppo_loss(logp, self.old_logp, self.adv1, self.mask)
        else:
            loss = self.opt.loss(logp, self.old_logp, self.adv, self.mask, shared=h)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss




def loss_only_fns(n: int):
    """method -> f(logp_leaf): the loss alone (the policy's forward/backward excluded)."""
    tokens, adv, mask = make_batch(n)
    g = torch.Generator().manual_seed(3)
    old = -4 * torch.rand(B, T, generator=g)
    logp0 = (old + 0.1 * torch.randn(B, T, generator=g)).to(DEVICE)
    old = old.to(DEVICE)
    dummy = torch.nn.Parameter(torch.zeros(1, device=DEVICE))
    opts = {
        "pama": pama_ext.PAMA(torch.optim.SGD([dummy], lr=0.0), n),
        "pama_accum": pama_ext.PAMA(torch.optim.SGD([dummy], lr=0.0), n),
        "linear": pama_ext.PAMA(torch.optim.SGD([dummy], lr=0.0), n, combiner="linear"),
    }
    adv1 = adv[..., 0].contiguous()

    def accum(lp):
        o = opts["pama_accum"]
        o.reset_accumulation()
        o.accumulate(old, old, adv, mask)
        return o.loss(lp, old, adv, mask)

    fns = {
        "noon": lambda lp: noon_ppo_loss(lp, old, adv1, mask),
        "pama": lambda lp: opts["pama"].loss(lp, old, adv, mask),
        "pama_accum": accum,
        "linear": lambda lp: opts["linear"].loss(lp, old, adv, mask),
    }
    return fns, logp0


def run_loss_only(n: int, rounds: int, calls: int = 50) -> dict:
    fns, logp0 = loss_only_fns(n)
    lp = logp0.clone().requires_grad_(True)
    wall = {m: [] for m in fns}
    cpu = {m: [] for m in fns}
    for i in range(rounds + 1):
        for m, f in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                f(lp).backward()
            sync()
            if i > 0:  # round 0 is the warm-up
                wall[m].append((time.perf_counter() - t0) / calls)
                cpu[m].append((time.process_time() - c0) / calls)
    return {
        m: {
            "min_s": min(wall[m]),
            "median_s": statistics.median(wall[m]),
            "cpu_min_s": min(cpu[m]),
            "cpu_median_s": statistics.median(cpu[m]),
        }
        for m in fns
    }


def setup(n: int, methods=METHODS):
    policy = make_policy()
    tokens, adv, mask = make_batch(n)
    with torch.no_grad():
        logp, _ = forward(policy, tokens)
    old_logp = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    return {m: Runner(m, n, policy, tokens, adv, mask, old_logp) for m in methods}


def run(ns=(2, 4), rounds: int = 15, warmup: int = 2, methods=METHODS, loss_calls: int = 50) -> dict:
    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "backends": pama_ext.available_backends(),
            "loadavg_before": os.getloadavg(),
        },
        "model": {**CFG, "params": sum(p.numel() for p in make_policy().parameters()), "B": B, "T": T},
        "results": {},
        "loss_only": {},
    }
    for n in ns:
        runners = setup(n, methods)
        for _ in range(warmup):
            for r in runners.values():
                r.step()
        wall = {m: [] for m in runners}
        cpu = {m: [] for m in runners}
        order = list(runners)
        for i in range(rounds):
            rot = order[i % len(order):] + order[: i % len(order)]
            for m in rot:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                runners[m].step()
                sync()
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        res = {
            m: {
                "min_s": min(wall[m]),
                "median_s": statistics.median(wall[m]),
                "cpu_min_s": min(cpu[m]),
                "cpu_median_s": statistics.median(cpu[m]),
                "rounds": len(wall[m]),
            }
            for m in runners
        }
        base = res["noon"]
        for m, r in res.items():
            for stat in ("min", "median", "cpu_min", "cpu_median"):
                r[f"ratio_to_noon_{stat}"] = r[f"{stat}_s"] / base[f"{stat}_s"]
                if "pama" in res:
                    r[f"ratio_to_pama_{stat}"] = r[f"{stat}_s"] / res["pama"][f"{stat}_s"]
        out["results"][f"N={n}"] = res
        lo = run_loss_only(n, rounds, loss_calls)
        for m, r in lo.items():
            for stat in ("min", "median", "cpu_min", "cpu_median"):
                r[f"added_{stat}_vs_noon_step"] = (r[f"{stat}_s"] - lo["noon"][f"{stat}_s"]) / base[f"{stat}_s"]
        out["loss_only"][f"N={n}"] = lo
        print(f"N={n} done", flush=True)
    out["machine"]["loadavg_after"] = os.getloadavg()
    return out


def table(data: dict) -> str:
    lines = [
        "| N | method | CPU min ms | CPU median ms | wall min ms | wall median ms | vs noon (CPU min) "
        "| vs noon (CPU median) | vs pama (CPU min) | vs pama (CPU median) | vs pama (wall min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, res in data["results"].items():
        for m, r in res.items():
            lines.append(
                f"| {key[2:]} | {m} | {1e3 * r['cpu_min_s']:.0f} | {1e3 * r['cpu_median_s']:.0f} | "
                f"{1e3 * r['min_s']:.0f} | {1e3 * r['median_s']:.0f} | "
                f"{r['ratio_to_noon_cpu_min']:.3f} | {r['ratio_to_noon_cpu_median']:.3f} | "
                f"{r.get('ratio_to_pama_cpu_min', float('nan')):.2f} | "
                f"{r.get('ratio_to_pama_cpu_median', float('nan')):.2f} | "
                f"{r.get('ratio_to_pama_min', float('nan')):.2f} |"
            )
    lines += [
        "",
        "| N | loss only | CPU min us | CPU median us | wall min us | added to the noon step (CPU min) "
        "| (CPU median) | (wall min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, res in data["loss_only"].items():
        for m, r in res.items():
            lines.append(
                f"| {key[2:]} | {m} | {1e6 * r['cpu_min_s']:.0f} | {1e6 * r['cpu_median_s']:.0f} | "
                f"{1e6 * r['min_s']:.0f} | {100 * r['added_cpu_min_vs_noon_step']:+.2f}% | "
                f"{100 * r['added_cpu_median_vs_noon_step']:+.2f}% | {100 * r['added_min_vs_noon_step']:+.2f}% |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"N={n}")
def runners(request):
    pytest.importorskip("transformers")
    return setup(request.param)


@pytest.mark.parametrize("method", METHODS)
def test_ppo_step(benchmark, runners, method):
    r = runners[method]
    benchmark.group = f"PPO step, N={r.n}"
    benchmark.pedantic(r.step, rounds=10, warmup_rounds=2, iterations=1)


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU, compare the wall-time ratios)")
    ap.add_argument("--model", default="small", choices=sorted(MODELS),
                    help="policy and minibatch: small (CPU default), gpt2 (124 M parameters, B=16, T=512), tiny")
    ap.add_argument("--loss-calls", type=int, default=50, help="loss-only calls per round")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    configure(args.model, args.device)
    assert "noon" in args.methods
    data = run(tuple(args.n), args.rounds, args.warmup, tuple(args.methods), args.loss_calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(json.dumps(data["machine"]), f"\nmodel: {data['model']}")
    print(table(data))


if __name__ == "__main__":
    main()
