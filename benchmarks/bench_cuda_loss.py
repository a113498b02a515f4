"""GPU benchmark of the fused PAMA loss: the CUDA kernels vs eager PyTorch, torch.compile and
Triton, with a device-to-device copy of the same bytes as the memory-bandwidth yardstick.

    python benchmarks/bench_cuda_loss.py                      # full grid, writes the JSON
    python benchmarks/bench_cuda_loss.py --tokens 65536 --n 2 --dtype float32 --reps 5

Grid: 64k, 1M and 16M tokens (rows of T = 1024 tokens, ~90% masked), N = 2, 4, 8 objectives,
float32 and bfloat16 inputs, granularity="batch", loss_agg="token_mean" (the default loss).
Each implementation is timed for forward only and forward + backward (grad of logp) with CUDA
events (median and min over --reps after --warmup calls):

* ``cuda``: ``pama_loss(backend="cuda", nonfinite="mask")`` (the fused CUDA op, no sync).
* ``torch``: ``pama_loss(backend="torch")``, the library's readable eager implementation.
* ``eager``: ``lean_loss`` below, the leanest eager PyTorch we could write for this loss
  (one Gram matmul, the N x N solve on the host: one small device-to-host copy).
* ``compile``: ``torch.compile(lean_loss)`` (the solve is a graph break).
* ``triton``: ``pama_loss(backend="triton")`` when the Triton backend is available.
* ``copy``: ``dst.copy_(src)`` of a byte buffer as large as the op's inputs (logp, old_logp,
  advantages, mask): what reading the inputs once costs at the device's copy bandwidth
  (the copy also writes them, so it is a pessimistic yardstick for a read-only pass).

Writes benchmarks/results/cuda_loss_<gpu>.json. Without a CUDA device it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

import pama_ext

HERE = os.path.dirname(os.path.abspath(__file__))
T_ROW = 1024
CLIP = 0.2


def make_inputs(tokens: int, n: int, dtype: torch.dtype, seed: int = 0):
    """[B, 1024] rows with 80-100% of each row masked, logp = old + N(0, 0.15^2) (about 10%
    of tokens clipped), standard-normal advantages [B, T, N]; generated on the GPU."""
    b = max(1, tokens // T_ROW)
    g = torch.Generator(device="cuda").manual_seed(seed)
    old = -3.0 * torch.rand(b, T_ROW, generator=g, device="cuda") - 0.05
    logp = old + 0.15 * torch.randn(b, T_ROW, generator=g, device="cuda")
    adv = torch.randn(b, T_ROW, n, generator=g, device="cuda")
    lengths = torch.randint(int(0.8 * T_ROW), T_ROW + 1, (b,), generator=g, device="cuda")
    mask = torch.arange(T_ROW, device="cuda")[None, :] < lengths[:, None]
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def lean_loss(logp, old_logp, advantages, mask, clip_eps: float = CLIP):
    """PAMA loss (granularity='batch', loss_agg='token_mean') as lean eager PyTorch: the
    same maths as the fused op (shared/PAMA.md), assuming finite inputs."""
    n = advantages.shape[-1]
    lp = logp.float()
    u = torch.exp(lp - old_logp.float())
    with torch.no_grad():
        keep = (u <= 1 + clip_eps) & mask
        a = advantages.float().clamp_min(0)
        ia = (a * keep[..., None]).reshape(-1, n)
        gram = ia.T.double() @ ia.double()
        c = pama_ext.min_norm_weights(gram.cpu()).to(a.device, torch.float32)  # the N x N solve
        s = a @ c
        m = mask.sum().clamp_min(1).float()
    m_ratio = torch.where(keep, u, torch.full_like(u, 1 + clip_eps))
    return -(s * m_ratio * mask).sum() / m


def _timed(fn, warmup: int, reps: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def _impls(compiled):
    impls = {
        "cuda": lambda *x: pama_ext.pama_loss(*x, backend="cuda", nonfinite="mask"),
        "torch": lambda *x: pama_ext.pama_loss(*x, backend="torch", nonfinite="mask"),
        "eager": lean_loss,
        "compile": compiled,
    }
    if "triton" in pama_ext.available_backends():
        impls["triton"] = lambda *x: pama_ext.pama_loss(*x, backend="triton", nonfinite="mask")
    return impls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1 << 16, 1 << 20, 1 << 24])
    ap.add_argument("--n", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--impls", nargs="*", default=None, help="subset of cuda torch eager compile triton")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("bench_cuda_loss: no CUDA device is available; run this on a GPU machine (see benchmarks/CUDA.md)")
    if "cuda" not in pama_ext.available_backends():
        print(
            "bench_cuda_loss: the cuda backend is unavailable: "
            f"{pama_ext.build_info()['unavailable'].get('cuda')}; timing the other implementations",
            file=sys.stderr,
        )

    gpu = torch.cuda.get_device_name()
    compiled = torch.compile(lean_loss)
    impls = _impls(compiled)
    if "cuda" not in pama_ext.available_backends():
        impls.pop("cuda")
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    results = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for tokens in args.tokens:
            for n in args.n:
                logp, old, adv, mask = make_inputs(tokens, n, dtype)
                in_bytes = sum(t.numel() * t.element_size() for t in (logp, old, adv, mask))
                src = torch.empty(in_bytes, dtype=torch.uint8, device="cuda")
                dst = torch.empty_like(src)
                reps = args.reps if tokens <= (1 << 20) else max(5, args.reps // 2)
                row = {
                    "tokens": logp.numel(), "B": logp.shape[0], "T": T_ROW, "N": n, "dtype": dtype_name,
                    "input_bytes": in_bytes,
                    "copy": _timed(lambda: dst.copy_(src), args.warmup, reps),
                }
                lp = logp.detach().clone().requires_grad_(True)
                ref = None
                for name, fn in impls.items():
                    try:
                        with torch.no_grad():
                            loss = fn(lp, old, adv, mask)
                        if ref is None:
                            ref = float(loss)
                        rel = abs(float(loss) - ref) / max(abs(ref), 1e-30)

                        def fwd(fn=fn):
                            with torch.no_grad():
                                fn(lp, old, adv, mask)

                        def fwd_bwd(fn=fn):
                            lp.grad = None
                            fn(lp, old, adv, mask).backward()

                        row[name] = {
                            "forward": _timed(fwd, args.warmup, reps),
                            "forward_backward": _timed(fwd_bwd, args.warmup, reps),
                            "loss_rel_diff_vs_first": rel,
                        }
                    except Exception as exc:  # an implementation that fails is reported, not fatal
                        row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                copy_ms = row["copy"]["min_ms"]
                row["copy_GBps"] = 2 * in_bytes / copy_ms / 1e6
                for name in impls:
                    if "forward" in row.get(name, {}):
                        f = row[name]["forward"]["min_ms"]
                        fb = row[name]["forward_backward"]["min_ms"]
                        row[name]["forward_vs_copy"] = f / copy_ms
                        row[name]["forward_backward_vs_copy"] = fb / copy_ms
                        if "cuda" in row and "forward" in row["cuda"] and name != "cuda":
                            row[name]["speedup_of_cuda_fwd_bwd"] = fb / row["cuda"]["forward_backward"]["min_ms"]
                results.append(row)
                summary = "  ".join(
                    f"{k}={row[k]['forward_backward']['min_ms']:.3f}ms"
                    for k in impls
                    if "forward_backward" in row.get(k, {})
                )
                print(f"{dtype_name} tokens={row['tokens']} N={n}: copy={copy_ms:.3f}ms  {summary}", flush=True)
                del logp, old, adv, mask, lp, src, dst
                torch.cuda.empty_cache()

    out = args.out or os.path.join(
        HERE, "results", "cuda_loss_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower() + ".json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "pama_ext_build": pama_ext.build_info(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "granularity": "batch",
        "loss_agg": "token_mean",
        "timing": "CUDA events; min and median over reps after warmup; ms",
    }
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
