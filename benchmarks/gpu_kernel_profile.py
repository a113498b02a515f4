"""Where the fused loss spends its device time, kernel by kernel, and the Triton launch
parameters measured rather than guessed (part of benchmarks/gpu_check.sh).

    python benchmarks/gpu_kernel_profile.py --out profile.json        # GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_kernel_profile.py --dry-run   # CPU flow check

1. ``profile``: fwd + bwd of ``pama_loss(nonfinite="mask")`` at B x T = 4096 x 4096 tokens,
   bf16, N in --ns, for the cuda and triton backends, under ``torch.profiler`` (CUPTI):
   every kernel's mean device time per call, and their sum next to the copy of the same
   bytes (the roofline of benchmarks/bench_gpu_loss.py).
2. ``triton_tuning``: the same step at N = 4 as a CUDA-graph replay (device time only)
   for a few values of the Triton host code's launch parameters (tokens per program of the
   token pass, its unrolled steps, its chunk, the backward block and warps), patched into
   ``pama_ext.triton_backend.ops`` for the measurement and restored after. The defaults are
   the first entry; the ratios say whether another value should become the default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pama_ext  # noqa: E402
from bench_gpu_loss import Timer, graph_times, input_bytes, make_inputs  # noqa: E402


def step_of(backend, x):
    lp = x[0].detach().clone().requires_grad_(True)

    def step():
        lp.grad = None
        pama_ext.pama_loss(lp, *x[1:], backend=backend, nonfinite="mask").backward()

    return step


def kernel_times(step, device, calls: int) -> dict:
    """kernel name -> mean device microseconds per call (CUPTI through torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "cuda_time_total", 0)
        if device.type == "cuda" and dev_us and ev.device_type.name == "CUDA":
            out[ev.key[:120]] = dev_us / calls
    return out


def copy_us(nbytes: int, device) -> float:
    """The copy of the same bytes (the roofline), best of 10, microseconds."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 1e6 * min(Timer(device).time(lambda: dst.copy_(src), 10, 2)) if device.type == "cuda" else 0.0


def graph_us(step, device, reps: int) -> float:
    """Device time of one step as a CUDA-graph replay (bench_gpu_loss.graph_times), microseconds."""
    if device.type != "cuda":
        step()  # the flow only
        return 0.0
    return 1e6 * min(graph_times(step, Timer(device), reps, device))


@contextlib.contextmanager
def patched(ops, **values):
    old = {k: getattr(ops, k) for k in values}
    try:
        for k, v in values.items():
            setattr(ops, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(ops, k, v)


def tuning_configs(ops):
    d_chunk, d_blk, d_warps = ops.token_chunk, ops.backward_block, ops.backward_warps
    return [
        ("defaults", {}),
        # the token pass's unrolled steps (loads in flight a thread; GPU.md, "The token pass")
        ("token_unroll=1", {"token_unroll": lambda bn, packed: 1}),
        ("token_unroll=2", {"token_unroll": lambda bn, packed: 2}),
        ("token_unroll=8", {"token_unroll": lambda bn, packed: 8}),
        ("tokens_per_program=8192", {"TOKENS_PER_PROGRAM": 8192}),
        ("tokens_per_program=512", {"TOKENS_PER_PROGRAM": 512}),
        ("gram_chunk/2", {"token_chunk": lambda bn, gram: max(2, d_chunk(bn, gram) // 2) if gram else d_chunk(bn, gram)}),
        ("gram_chunk*2", {"token_chunk": lambda bn, gram: min(1024, d_chunk(bn, gram) * 2) if gram else d_chunk(bn, gram)}),
        ("backward_block=1024,warps=4", {"backward_block": lambda bn: 1024, "backward_warps": lambda bn: 4}),
        ("backward_block=2048,warps=8", {"backward_block": lambda bn: 2048, "backward_warps": lambda bn: 8}),
        ("backward_warps=2x", {"backward_warps": lambda bn: min(16, 2 * d_warps(bn))}),
        ("backward_block/2", {"backward_block": lambda bn: max(64, d_blk(bn) // 2)}),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="4,5,16,64")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-tuning", dest="tuning", action="store_false")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny, on CPU through Triton's interpreter")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_kernel_profile.py: no CUDA device; use --dry-run on CPU")
    b, t = (2, 48) if args.dry_run else (4096, 4096)
    avail = pama_ext.available_backends()
    backends = [x for x in args.backends.split(",") if x in avail or (args.dry_run and x == "triton")]
    report = {"B": b, "T": t, "dtype": "bf16", "profile": {}, "triton_tuning": {}}
    for n in (int(v) for v in args.ns.split(",")):
        x = make_inputs(b, t, n, torch.float32 if args.dry_run else torch.bfloat16, device, seed=n)
        nbytes = input_bytes(x)
        cp = copy_us(nbytes, device)
        for backend in backends:
            try:
                kt = kernel_times(step_of(backend, x), device, args.calls)
                entry = {"kernels_us": kt, "sum_us": sum(kt.values()), "copy_us": cp,
                         "sum_over_copy": (sum(kt.values()) / cp) if cp else None}
            except Exception as exc:  # recorded, not hidden
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            report["profile"][f"{backend} N={n}"] = entry
            if "error" in entry:
                print(f"{backend} N={n}: ERROR {entry['error']}", flush=True)
            else:
                top = sorted(entry["kernels_us"].items(), key=lambda kv: -kv[1])[:4]
                print(f"{backend} N={n}: {entry['sum_us']:.0f} us of kernels per fwd+bwd "
                      f"({entry['sum_over_copy'] or 0:.2f}x the copy of the same bytes): "
                      + "; ".join(f"{k[:40]} {v:.0f}" for k, v in top), flush=True)
        del x
    if args.tuning and "triton" in backends:
        from pama_ext.triton_backend import ops

        x = make_inputs(b, t, 4, torch.float32 if args.dry_run else torch.bfloat16, device, seed=4)
        base = None
        for name, values in tuning_configs(ops)[: 2 if args.dry_run else None]:
            try:
                with patched(ops, **values):
                    us = graph_us(step_of("triton", x), device, args.reps)
                base = us if base is None else base
                report["triton_tuning"][name] = {"graph_us": us, "x_defaults": (us / base) if base else None}
                print(f"triton tuning {name}: {us:.0f} us ({(us / base) if base else 0:.2f}x the defaults)", flush=True)
            except Exception as exc:
                report["triton_tuning"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"triton tuning {name}: ERROR {exc}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
