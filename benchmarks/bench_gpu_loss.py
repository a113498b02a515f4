"""GPU benchmark of the PAMA loss, forward + backward: Triton and CUDA kernels vs eager
PyTorch and torch.compile, with a device-to-device copy of the same bytes as the roofline.

Run on a machine with an NVIDIA GPU (see benchmarks/GPU.md)::

    python benchmarks/bench_gpu_loss.py                 # 64k, 1M, 16M tokens x N = 2, 4, 8 x fp32, bf16
    python benchmarks/bench_gpu_loss.py --sizes 1M --ns 8 --dtypes bf16 --reps 50
    TRITON_INTERPRET=1 python benchmarks/bench_gpu_loss.py --dry-run   # CPU check of the script

Writes ``benchmarks/results/gpu_loss_<gpu-name>.json`` and prints a table.

Implementations (each timed as ``loss = f(logp, old_logp, advantages, mask); loss.backward()``
with ``logp`` a leaf that requires grad, granularity ``batch`` unless ``--granularity``):

* ``triton``: ``pama_loss(..., backend="triton", nonfinite="mask")`` (the sync-free mode);
* ``cuda``: ``pama_loss(..., backend="cuda", nonfinite="mask")`` when the extension was built
  with the CUDA kernels;
* ``torch``: ``pama_loss(..., backend="torch", nonfinite="mask")``, the library's readable
  eager reference (it solves the weights on the host: one synchronisation per call);
* ``eager``: ``eager_pama_loss`` below, a lean eager implementation written to be
  compile-friendly (no host synchronisation: the exact min-norm solve enumerates the
  2^N - 1 supports with batched ``torch.linalg.solve_ex`` on the device); ``batch`` only;
* ``compiled``: ``torch.compile(eager_pama_loss, fullgraph=True)`` (inductor).

``copy`` is ``dst.copy_(src)`` of a flat byte buffer as large as the inputs (logp, old_logp,
advantages, mask). Its bandwidth, 2 x input bytes / time (read + write), is the reference
point: an implementation's bandwidth is its compulsory traffic, 2 x input bytes + gradient
bytes (the forward reads the inputs once, the backward reads them again and writes
dL/dlogp), divided by its time, reported as a fraction of the copy's bandwidth.
Timing: CUDA events around each call after warm-up; median and minimum over ``--reps``.
An eager call's time includes the host's per-call work whenever the host, not the GPU, is
the slower of the two (always at small sizes), so the fused backends (``GRAPHED``) are also
timed as a CUDA-graph replay of the same step (``graph_min_ms``, ``graph_frac_of_copy_bw``):
the device time of their kernels. ``--host-overhead`` measures the per-call host time on a
tiny batch, in units of ``(logp * 2).sum().backward()``.
A no-sync check runs each implementation once under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import pama_ext  # noqa: E402

SIZES = {"64k": (64, 1024), "1M": (256, 4096), "16M": (4096, 4096)}
# the fused backends are sync-free with nonfinite="mask": also timed as a CUDA-graph replay
GRAPHED = ("cuda", "triton")
# above it the Triton backend solves the batch weights on the host (importing ops imports no Triton)
from pama_ext.triton_backend.ops import ENUM_MAX_N as TRITON_ENUM_MAX_N  # noqa: E402
DRY_SIZES = {"tiny": (2, 48)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP_EPS = 0.2


# --------------------------------------------------------------------------- inputs
def make_inputs(b: int, t: int, n: int, dtype, device, seed: int = 0):
    """Ragged rows (each response fills 80-100% of T), logp = old_logp + N(0, 0.15^2) (about
    10% of the tokens clipped at eps = 0.2), standard-normal advantages [B, T, N]; the
    distribution of benchmarks/eager_baselines.make_inputs, generated on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    old = -3.0 * torch.rand(b, t, generator=g, device=device) - 0.05
    logp = old + 0.15 * torch.randn(b, t, generator=g, device=device)
    adv = torch.randn(b, t, n, generator=g, device=device)
    lengths = torch.randint(int(0.8 * t), t + 1, (b,), generator=g, device=device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def input_bytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in x)


# --------------------------------------------------------------------------- the eager baseline
def min_norm_enumerate(gram: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of c^T G c, exactly, with device-side tensor ops only: the
    affine minimiser of every support (batched bordered KKT systems), the best feasible one.
    2^N - 1 systems of size N + 1: for the N <= 10 of this benchmark."""
    n = gram.shape[0]
    if n == 1:
        return gram.new_ones(1)
    dev, dt = gram.device, gram.dtype
    ids = torch.arange(1, 2**n, device=dev)
    ins = ((ids[:, None] >> torch.arange(n, device=dev)) & 1).to(dt)  # [S, n]
    h = gram / gram.diagonal().amax().clamp_min(torch.finfo(dt).tiny)
    k = torch.zeros(ins.shape[0], n + 1, n + 1, dtype=dt, device=dev)
    k[:, :n, :n] = h * ins[:, :, None] * ins[:, None, :] + torch.diag_embed(1 - ins)
    k[:, :n, n] = ins
    k[:, n, :n] = ins
    rhs = torch.zeros(ins.shape[0], n + 1, dtype=dt, device=dev)
    rhs[:, n] = 1
    mu, _ = torch.linalg.solve_ex(k, rhs)
    c = torch.nan_to_num(mu[:, :n] * ins, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    tot = c.sum(1, keepdim=True)
    c = c / tot.clamp_min(torch.finfo(dt).tiny)
    obj = ((c @ h) * c).sum(1)
    obj = torch.where((tot[:, 0] > 0) & torch.isfinite(obj), obj, torch.full_like(obj, math.inf))
    return torch.index_select(c, 0, obj.argmin().reshape(1))[0]  # no data-dependent indexing


def eager_pama_loss(logp, old_logp, advantages, mask, clip_eps: float = CLIP_EPS):
    """PAMA loss, granularity 'batch', loss_agg 'token_mean', as plain PyTorch (float32 maths)."""
    n = advantages.shape[-1]
    u = torch.exp(logp.float() - old_logp.float())
    with torch.no_grad():
        keep = (u <= 1 + clip_eps) & mask
        a = advantages.float().clamp_min(0)
        flat = (a * keep.unsqueeze(-1)).reshape(-1, n)
        c = min_norm_enumerate((flat.T @ flat).double()).float()
        s = a @ c
        inv_m = 1.0 / mask.sum().clamp_min(1).float()
    per_token = s * torch.clamp(u, max=1 + clip_eps)
    return -(per_token * mask).sum() * inv_m


# --------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, reps: int, warmup: int):
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out


def fwd_bwd(loss_fn, x):
    logp = x[0].detach().clone().requires_grad_(True)

    def step():
        logp.grad = None
        loss = loss_fn(logp, *x[1:])
        loss.backward()
        return loss

    return logp, step


def graph_times(step, timer, reps: int, device):
    """Device time of one step: the step captured in a CUDA graph and replayed, so the
    host's per-call work (Python, dispatch, launches) is out of the figure. Returns the
    list of replay times, or raises when the step cannot be captured (a host sync)."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    try:
        return timer.time(graph.replay, reps, 2)
    finally:
        del graph


def host_overhead(fn, device, calls: int = 200) -> dict:
    """Per-call host time of fwd + bwd on a tiny batch (B=1, T=8, N=2): the fixed cost a
    call adds however small the batch, next to ``(logp * 2).sum().backward()`` on the same
    leaf (one elementwise op, one reduction and their backward) as the unit."""
    lp0, old, adv, mask = make_inputs(1, 8, 2, torch.float32, device)
    lp = lp0.detach().clone().requires_grad_(True)

    def per_call(f):
        for _ in range(min(20, calls)):
            f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls

    unit = per_call(lambda: (lp * 2).sum().backward())
    t = per_call(lambda: fn(lp, old, adv, mask).backward())
    return {"us_per_call": 1e6 * t, "unit_us": 1e6 * unit, "x_unit": t / unit}


def check_no_sync(step, device) -> str:
    """'ok', or the error raised under set_sync_debug_mode('error')."""
    if device.type != "cuda":
        return "n/a (cpu)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        result = "ok"
    except RuntimeError as exc:
        result = f"syncs: {str(exc).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return result


def peak_extra_bytes(step, device) -> int:
    if device.type != "cuda":
        return -1
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


# --------------------------------------------------------------------------- the run
def implementations(args, device):
    avail = pama_ext.available_backends()
    impls = {}
    for name in ("triton", "cuda"):
        if name in args.impls and name in avail and device.type in pama_ext._backends._REGISTRY[name].devices:
            impls[name] = lambda lp, old, adv, mask, _b=name: pama_ext.pama_loss(
                lp, old, adv, mask, clip_eps=CLIP_EPS, granularity=args.granularity, backend=_b, nonfinite="mask"
            )
    if "torch" in args.impls:
        impls["torch"] = lambda lp, old, adv, mask: pama_ext.pama_loss(
            lp, old, adv, mask, clip_eps=CLIP_EPS, granularity=args.granularity, backend="torch", nonfinite="mask"
        )
    if args.granularity == "batch":
        if "eager" in args.impls:
            impls["eager"] = eager_pama_loss
        if "compiled" in args.impls:
            backend = "aot_eager" if device.type != "cuda" else "inductor"
            impls["compiled"] = torch.compile(eager_pama_loss, fullgraph=True, backend=backend)
    return impls


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(args) -> dict:
    device = torch.device("cuda" if not args.dry_run else "cpu")
    timer = Timer(device)
    sizes = DRY_SIZES if args.dry_run else SIZES
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    meta = {
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "pama_ext_backends": pama_ext.available_backends(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "granularity": args.granularity,
        "clip_eps": CLIP_EPS,
        "reps": args.reps,
        "warmup": args.warmup,
        "dry_run": args.dry_run,
        "bandwidth_definition": (
            "copy: 2 x input bytes / time; implementation: (2 x input bytes + gradient bytes) / time; "
            "frac_of_copy = implementation bandwidth / copy bandwidth"
        ),
    }
    impls = implementations(args, device)
    results = []
    overhead = {}
    if args.host_overhead:
        for name in ("cuda", "triton", "torch"):
            if name in impls:
                overhead[name] = host_overhead(impls[name], device, calls=3 if args.dry_run else 200)
                print(f"host overhead {name}: {overhead[name]['us_per_call']:.0f} us per fwd+bwd call "
                      f"({overhead[name]['x_unit']:.1f}x a (logp * 2).sum().backward())", flush=True)
    meta["host_overhead"] = overhead
    for size_name in args.sizes:
        b, t = sizes[size_name]
        for n in args.ns:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                x = make_inputs(b, t, n, dtype, device, seed=b * t + n)
                nbytes = input_bytes(x)
                grad_bytes = x[0].numel() * x[0].element_size()
                src = torch.empty(nbytes, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                copy_t = timer.time(lambda: dst.copy_(src), args.reps, args.warmup)
                copy_s = min(copy_t)
                copy_bw = 2 * nbytes / copy_s
                del src, dst
                row = {
                    "size": size_name, "B": b, "T": t, "N": n, "dtype": dname, "tokens": b * t,
                    "input_bytes": nbytes, "copy_ms": 1e3 * statistics.median(copy_t), "copy_min_ms": 1e3 * copy_s,
                    "copy_GBps": copy_bw / 1e9, "impls": {},
                }
                ref_loss = ref_grad = None
                for name, fn in impls.items():
                    entry = {}
                    try:
                        logp, step = fwd_bwd(fn, x)
                        loss = step()  # also the compile / autotune / first-call warm-up
                        timer.sync()
                        if ref_loss is None:
                            ref_name, ref_loss, ref_grad = name, loss.detach(), logp.grad.detach().clone()
                        else:
                            entry["loss_rel_err_vs_" + ref_name] = abs(float(loss.detach()) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
                            entry["grad_rel_err_vs_" + ref_name] = rel_err(logp.grad, ref_grad)
                        entry["no_sync"] = check_no_sync(step, device)
                        entry["peak_extra_bytes"] = peak_extra_bytes(step, device)
                        ts = timer.time(step, args.reps, args.warmup)
                        med, mn = statistics.median(ts), min(ts)
                        moved = 2 * nbytes + grad_bytes
                        entry.update(
                            median_ms=1e3 * med, min_ms=1e3 * mn, GBps=moved / mn / 1e9,
                            frac_of_copy_bw=(moved / mn) / copy_bw, x_copy_time=mn / copy_s,
                        )
                        host_solve = name == "triton" and args.granularity == "batch" and n > TRITON_ENUM_MAX_N
                        if not (args.graphs and name in GRAPHED and device.type == "cuda"):
                            pass
                        elif host_solve:  # not attempted: a capture that meets a sync can leave the stream unusable
                            entry["graph_error"] = (f"not capturable: the Triton batch solve for N > {TRITON_ENUM_MAX_N} "
                                                    "runs on the host (a documented sync)")
                        else:
                            try:
                                gt = min(graph_times(step, timer, args.reps, device))
                                entry.update(graph_min_ms=1e3 * gt, graph_frac_of_copy_bw=(moved / gt) / copy_bw)
                            except Exception as exc:  # not capturable (a host sync): said, not hidden
                                entry["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    except Exception as exc:  # recorded, the run goes on (e.g. out of memory)
                        entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    row["impls"][name] = entry
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results.append(row)
                print(format_row(row), flush=True)
                del x
    return {"meta": meta, "results": results}


def _triton_version():
    try:
        import importlib.metadata

        return importlib.metadata.version("triton")
    except Exception:
        return None


def format_row(row) -> str:
    head = f"{row['size']:>4} N={row['N']} {row['dtype']}: copy {row['copy_min_ms']:.3f} ms ({row['copy_GBps']:.0f} GB/s)"
    parts = []
    for name, e in row["impls"].items():
        if "error" in e:
            parts.append(f"{name} ERROR")
        else:
            graph = f", graph {e['graph_min_ms']:.3f} ms = {100 * e['graph_frac_of_copy_bw']:.0f}%" if "graph_min_ms" in e else ""
            parts.append(f"{name} {e['min_ms']:.3f} ms ({100 * e['frac_of_copy_bw']:.0f}% of copy bw{graph}, sync: {e['no_sync']})")
    return head + "\n    " + "\n    ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma list of 64k,1M,16M (default: all)")
    p.add_argument("--ns", default="2,4,8")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--impls", default="triton,cuda,torch,eager,compiled")
    p.add_argument("--granularity", default="batch", choices=pama_ext.GRANULARITIES)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_loss_<gpu>.json)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="skip the CUDA-graph replay timing of the fused backends (device time)")
    p.add_argument("--host-overhead", action="store_true",
                   help="also measure the per-call host time of a tiny fwd+bwd for each fused backend")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on CPU tensors through Triton's interpreter: checks the script, times nothing useful")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            "bench_gpu_loss.py: no CUDA device visible to torch (torch.cuda.is_available() is False). "
            "This benchmark needs an NVIDIA GPU (H100 / H200); see benchmarks/GPU.md. "
            "`python benchmarks/bench_gpu_loss.py --dry-run` checks the script on CPU."
        )
    args.sizes = (args.sizes or ",".join(DRY_SIZES if args.dry_run else SIZES)).split(",")
    args.ns = [int(v) for v in args.ns.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.impls = args.impls.split(",")
    if args.dry_run:
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    report = run(args)
    if args.out is None and args.dry_run:
        print(json.dumps(report, indent=1)[:2000])
        return report
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", report["meta"]["gpu"]).strip("-")
    out = Path(args.out) if args.out else HERE / "results" / f"gpu_loss_{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
