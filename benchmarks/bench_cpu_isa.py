"""CPU benchmark: the fused op's instruction-set paths, and the issue-14 goals, as ratios.

    .venv/bin/python benchmarks/bench_cpu_isa.py      # writes benchmarks/results/cpu_isa.json

Not a test (no ``test_`` function). One thread unless said otherwise; every figure is the
fastest of a few fwd+bwd calls, and each ratio compares two measurements of the same run:

* ``grid``: ms per ``pama_loss`` fwd+bwd at 128 x 4096 tokens for N = 2, 4, 5, 8, 16 and
  granularities batch / token / sequence, with ``PAMA_EXT_CPU_ISA`` forced to baseline,
  avx2, avx512 and left on auto (the dispatcher's choice, ``csrc/pama_cpu.cpp``).
* ``goals`` (auto): at 1M tokens, N = 4: the fraction of a same-process copy's bandwidth the
  op reaches on its compulsory bytes (inputs read twice, gradient written once) for
  ``batch``; ``token`` time / ``batch`` time; lean eager PyTorch / op; N = 8 and N = 16 time
  per token / N = 4's; at 16M tokens two threads / one thread. And GAE (1M tokens, N = 4)
  against its PyTorch reference and against a copy of its inputs.

The allocator is held steady (``steady_allocator``): glibc is told not to hand freed memory
back to the OS between calls (``M_TRIM_THRESHOLD``, ``M_TOP_PAD``, ``M_MMAP_THRESHOLD`` at its
32 MiB maximum), as a training process's warmed-up heap behaves. Without it each call's fresh
[B, T] buffers (the gradient; for ``token`` also the forward's factor) may or may not be
first-touched again, depending on what the previous call freed: on the 2-core machine that
moved ``token`` fwd+bwd at 1M tokens between 8.7 and 14.7 ms from one run to the next.
``PAMA_BENCH_RAW_MALLOC=1`` measures with glibc's defaults.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pama_ext  # noqa: E402
from eager_baselines import lean_pama_loss  # noqa: E402
from pama_ext.rl import per_objective_gae  # noqa: E402
from pama_ext.rl.gae import gae_reference  # noqa: E402


def steady_allocator() -> dict:
    """glibc: keep freed memory in the heap (see the module docstring); {} elsewhere."""
    if os.environ.get("PAMA_BENCH_RAW_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return {}
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {}
    # mallopt parameters (malloc.h): M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3
    settings = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 1 << 28), "M_MMAP_THRESHOLD": (-3, 1 << 25)}
    return {name: value for name, (param, value) in settings.items() if libc.mallopt(param, value) == 1}


def inputs(B, T, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(B, T, generator=g) * 0.1).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=g)
    return logp, old, torch.randn(B, T, N, generator=g), torch.ones(B, T, dtype=torch.bool)


def best(f, k=3) -> float:
    f()
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def fwd_bwd(fn, x, **kw):
    def f():
        fn(*x, **kw).backward()
        x[0].grad = None
    return f


def set_isa(isa):
    if isa == "auto":
        os.environ.pop("PAMA_EXT_CPU_ISA", None)
    else:
        os.environ["PAMA_EXT_CPU_ISA"] = isa


def grid() -> dict:
    out = {}
    for n in (2, 4, 5, 8, 16):
        x = inputs(128, 4096, n)
        for gran in ("batch", "token", "sequence"):
            row = {}
            for isa in ("baseline", "avx2", "avx512", "auto"):
                set_isa(isa)
                row[isa] = 1e3 * best(fwd_bwd(pama_ext.pama_loss, x, granularity=gran, backend="cpp"))
            row["baseline_over_auto"] = row["baseline"] / row["auto"]
            out[f"N={n} {gran}"] = row
            print(f"N={n:2d} {gran:9s} " + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()))
    set_isa("auto")
    return out


def goals() -> dict:
    set_isa("auto")
    torch.set_num_threads(1)
    x = inputs(256, 4096, 4)
    src = torch.cat([x[0].detach().flatten(), x[1].flatten(), x[2].flatten()])
    dst = torch.empty_like(src)
    t_copy = best(lambda: dst.copy_(src), 5)
    compulsory = 2 * (x[0].numel() * 8 + x[2].numel() * 4 + x[3].numel()) + x[0].numel() * 4
    t_batch = best(fwd_bwd(pama_ext.pama_loss, x, granularity="batch", backend="cpp"), 5)
    t_token = best(fwd_bwd(pama_ext.pama_loss, x, granularity="token", backend="cpp"), 5)
    t_lean = best(fwd_bwd(lean_pama_loss, x), 5)
    per_n = {}
    for n in (8, 16):
        y = inputs(256, 4096, n)
        per_n[n] = best(fwd_bwd(pama_ext.pama_loss, y, granularity="batch", backend="cpp")) / t_batch
    z = inputs(1024, 16384, 4)
    t1 = best(fwd_bwd(pama_ext.pama_loss, z, granularity="batch", backend="cpp"), 2)
    torch.set_num_threads(2)
    t2 = best(fwd_bwd(pama_ext.pama_loss, z, granularity="batch", backend="cpp"), 2)
    torch.set_num_threads(1)
    r, v = torch.randn(256, 4096, 4), torch.randn(256, 4096, 4)
    m = torch.ones(256, 4096, dtype=torch.bool)
    gsrc, gdst = torch.cat([r.flatten(), v.flatten()]), torch.empty(2 * r.numel())
    t_gae = best(lambda: per_objective_gae(r, v, m, gamma=1.0, lam=0.95), 5)
    t_gcopy = best(lambda: gdst.copy_(gsrc), 10)
    t_gref = best(lambda: gae_reference(r, v, m, 1.0, 0.95), 1)
    out = {
        "batch_bandwidth_fraction_of_copy": (compulsory / t_batch) / (src.numel() * 4 * 2 / t_copy),
        "token_over_batch_time": t_token / t_batch,
        "lean_eager_over_op": t_lean / t_batch,
        "n8_per_token_over_n4": per_n[8],
        "n16_per_token_over_n4": per_n[16],
        "two_threads_speedup_16M": t1 / t2,
        "gae_over_copy_of_inputs": t_gae / t_gcopy,
        "gae_reference_over_kernel": t_gref / t_gae,
        "ms": {"copy_1M_n4_inputs": 1e3 * t_copy, "batch": 1e3 * t_batch, "token": 1e3 * t_token,
               "lean_eager": 1e3 * t_lean, "16M_1_thread": 1e3 * t1, "16M_2_threads": 1e3 * t2,
               "gae": 1e3 * t_gae, "gae_inputs_copy": 1e3 * t_gcopy, "gae_reference": 1e3 * t_gref},
    }
    for k, v in out.items():
        print(f"{k}: {v:.3f}" if not isinstance(v, dict) else f"{k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v.items()))
    return out


def main():
    torch.set_num_threads(1)
    malloc = steady_allocator()
    info = pama_ext.build_info()["extension"]
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "cpu_isa_compiled": info["cpu_isa_compiled"], "cpu_isa_best": info["cpu_isa_best"],
                       "load": os.getloadavg(), "mallopt": malloc},
           "grid_ms": grid(), "goals": goals()}
    out = HERE / "results" / "cpu_isa.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
