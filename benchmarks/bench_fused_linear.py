"""Benchmark: ``fused_linear_pama_loss`` against the unfused path (full logits, log_softmax,
gather, ``pama_loss``), forward + backward, memory and time.

    .venv/bin/python benchmarks/bench_fused_linear.py                 # CPU, the issue's sizes
    python benchmarks/bench_fused_linear.py --device cuda             # GPU sizes, bf16 (+ Liger if installed)

writes ``benchmarks/results/fused_linear_<device>.json`` and prints the ratios. Not a test
(no ``test_`` function), so ``pytest benchmarks/`` ignores it.

Each variant runs in a fresh subprocess (``--worker``), so that one variant's freed memory
cannot hide another's peak:

* CPU: ``peak_growth_bytes`` = the process's peak resident set (``ru_maxrss``) after the
  timed calls minus its resident set just before the first forward (inputs, model and
  warm-up of nothing else already in place). GPU: ``torch.cuda.max_memory_allocated``
  minus the allocated bytes before the first forward.
* time: ``--reps`` calls of forward + backward after one warm-up call; the median.

Defaults (issue 15): CPU float32, B*T = 8192 tokens (B 8 x T 1024), H 512, V 32768, N 4;
GPU bf16, B*T = 16384 (B 8 x T 2048), H 4096, V 128256, N 4. Variants: ``unfused`` and
``fused`` at granularity ``token`` (the default, one pass) and ``batch`` (two passes), and
on a GPU with Liger-Kernel installed, Liger's ``LigerFusedLinearGRPOLoss`` for N = 1 beside
``fused`` with N = 1. Ratios are fused / unfused of the same granularity, same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--time", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--objectives", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers (CPU)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sizes(args):
    if args.device == "cpu":
        d = dict(batch=8, time=1024, hidden=512, vocab=32768, dtype="float32")
    else:
        d = dict(batch=8, time=2048, hidden=4096, vocab=128256, dtype="bfloat16")
    for k in ("batch", "time", "hidden", "vocab"):
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    d["objectives"] = args.objectives
    return d


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args) -> dict:
    import torch

    import pama_ext
    from pama_ext.fused_linear.reference import unfused_linear_pama_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    sz = sizes(args)
    variant = args.worker
    kind, granularity = variant.split(":")
    dev = torch.device(args.device)
    dtype = getattr(torch, sz["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, H, V = sz["batch"], sz["time"], sz["hidden"], sz["vocab"]
    N = 1 if kind in ("liger", "fused_n1", "unfused_n1") else sz["objectives"]
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).to(dev, dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dev, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask[:, : T // 8] = False  # a prompt part
    old = torch.full((B, T), -float(torch.log(torch.tensor(float(V)))), device=dev) + 0.05 * torch.randn(B, T, generator=g).to(dev)
    adv = torch.randn(B, N, generator=g).to(dev)

    if kind in ("fused", "fused_n1"):
        def call():
            return pama_ext.fused_linear_pama_loss(hidden, weight, targets, old, adv, mask, granularity=granularity)
    elif kind in ("unfused", "unfused_n1"):
        def call():
            return unfused_linear_pama_loss(hidden, weight, targets, old, adv, mask, granularity=granularity)
    elif kind == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

        def call():
            out = liger(hidden, weight, targets, mask.long(), adv[:, 0], old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise SystemExit(f"unknown variant {variant}")

    def step():
        hidden.grad = None
        weight.grad = None
        loss = call()
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    loss = None
    for i in range(args.reps + 1):
        t0 = time.perf_counter()
        loss = step()
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss_bytes()) - base
    return dict(variant=variant, loss=float(loss), median_s=statistics.median(times), times_s=times,
                peak_growth_bytes=int(peak), grad_norm_hidden=float(hidden.grad.float().norm()),
                grad_norm_weight=float(weight.grad.float().norm()))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = ["unfused:token", "fused:token", "unfused:batch", "fused:batch"]
    if args.device == "cuda":
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is not None:
            variants += ["liger:token", "fused_n1:token", "unfused_n1:token"]
    if args.variants:
        variants = args.variants.split(",")
    results = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--worker", v, "--device", args.device, "--reps", str(args.reps),
               "--objectives", str(args.objectives)]
        for k in ("batch", "time", "hidden", "vocab", "threads"):
            if getattr(args, k) is not None:
                cmd += [f"--{k}", str(getattr(args, k))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results[v] = {"error": out.stderr[-2000:]}
            print(f"{v}: FAILED\n{out.stderr[-2000:]}")
            continue
        results[v] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[v]
        print(f"{v:18s} median {r['median_s']:.3f} s  peak growth {r['peak_growth_bytes'] / 2**20:9.1f} MiB  loss {r['loss']:.6f}")
    ratios = {}
    for gr in ("token", "batch"):
        f, u = results.get(f"fused:{gr}", {}), results.get(f"unfused:{gr}", {})
        if "median_s" in f and "median_s" in u:
            ratios[gr] = dict(time=f["median_s"] / u["median_s"], peak_memory=f["peak_growth_bytes"] / max(u["peak_growth_bytes"], 1),
                              loss_abs_diff=abs(f["loss"] - u["loss"]))
    if "median_s" in results.get("liger:token", {}) and "median_s" in results.get("fused_n1:token", {}):
        f, l = results["fused_n1:token"], results["liger:token"]
        ratios["n1_fused_vs_liger"] = dict(time=f["median_s"] / l["median_s"], peak_memory=f["peak_growth_bytes"] / max(l["peak_growth_bytes"], 1))
    for k, r in ratios.items():
        print(f"{k}: " + ", ".join(f"{m} {x:.3g}" for m, x in r.items()))
    import torch

    doc = dict(
        sizes=sizes(args), reps=args.reps, threads=args.threads, device=args.device,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     load_before=os.getloadavg()),
        results=results, ratios=ratios,
    )
    out = Path(args.out) if args.out else HERE / "results" / f"fused_linear_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
