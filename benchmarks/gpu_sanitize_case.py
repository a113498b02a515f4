"""A small, complete workload of the GPU kernels, for compute-sanitizer (memcheck, racecheck).

Every granularity (each loss aggregation on alternate cases), per-token [B, T, N] and per-sequence [B, N]
advantages, N through the specialised widths and the runtime-N path (1, 2, 3, 5, 8, 64),
rows shorter and longer than a block, an empty row, a row of non-finite values under
``nonfinite="mask"``, float32 and bfloat16; forward and backward, each result compared with
the float64 reference so that a run that reads garbage also fails without the sanitizer.
Sizes are tiny: under memcheck every access is instrumented.

    python benchmarks/gpu_sanitize_case.py --backend cuda            # plain run (also warms Triton's cache)
    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/gpu_sanitize_case.py --backend cuda
    python benchmarks/gpu_sanitize_case.py --backend cpp --device cpu  # the same flow on CPU (gpu_check --dry-run)

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck (gpu_check.sh does), so that an
access past a tensor's end leaves its cudaMalloc block instead of landing in the cache.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import pama_ext

NS = (1, 2, 3, 5, 8, 64)
SHAPES = ((3, 5), (4, 700))  # (B, T): rows shorter than a block; rows spanning several blocks


def make_case(b, t, n, per_seq, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(b, t, generator=g) - 0.05
    logp = old + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(*((b, n) if per_seq else (b, t, n)), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0] = False  # an empty row
    adv[-1] = float("inf")  # a non-finite row, dropped under nonfinite="mask"
    return [x.to(device) for x in (logp.to(dtype), old.to(dtype), adv.to(dtype), mask)]


def one(backend, device, b, t, n, per_seq, gran, agg, dtype, seed) -> float:
    logp, old, adv, mask = make_case(b, t, n, per_seq, dtype, device, seed)
    kw = dict(granularity=gran, loss_agg=agg, nonfinite="mask")
    lp = logp.clone().requires_grad_(True)
    loss, info = pama_ext.pama_loss_and_stats(lp, old, adv, mask, backend=backend, **kw)
    loss.backward()
    # the float64 reference on the same rounded values
    lr = logp.double().cpu().requires_grad_(True)
    ref, _ = pama_ext.pama_loss_and_stats(lr, old.double().cpu(), adv.double().cpu(), mask.cpu(), backend="torch", **kw)
    ref.backward()
    err = max(
        abs(float(loss.detach()) - float(ref.detach())) / max(abs(float(ref.detach())), 1.0),
        float((lp.grad.double().cpu() - lr.grad).abs().max()) / max(float(lr.grad.abs().max()), 1e-6),
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if not (err <= tol and torch.isfinite(info.weights).all()):
        raise AssertionError(f"{backend} B={b} T={t} N={n} per_seq={per_seq} {gran}/{agg} {dtype}: rel err {err:.3g}")
    return err


def raise_paths(backend, device) -> int:
    """nonfinite="raise" (the default) must raise ValueError naming the argument, on the
    backend's own raise path (for cuda: the C++ glue's one documented host read). A crash
    here (a signal, not an exception) is what gpu_check.sh reruns under cuda-gdb."""
    checked = 0
    for n, per_seq, gran in itertools.product((1, 3, 8), (False, True), ("batch", "token", "sequence")):
        logp, old, adv, mask = make_case(4, 40, n, per_seq, torch.float32, device, seed=n)
        adv = torch.nan_to_num(adv, posinf=1.0)
        mask[:] = True
        for name in ("logp", "old_logp", "advantages"):
            bad = {"logp": logp.clone(), "old_logp": old.clone(), "advantages": adv.clone()}
            bad[name].view(-1)[3] = float("nan")
            try:
                pama_ext.pama_loss(bad["logp"], bad["old_logp"], bad["advantages"], mask, granularity=gran, backend=backend)
            except ValueError as exc:
                if f"`{name}` has " not in str(exc):
                    raise AssertionError(f"{backend} N={n} {gran}: the error names the wrong argument: {exc}") from exc
            else:
                raise AssertionError(f"{backend} N={n} per_seq={per_seq} {gran}: NaN in `{name}` did not raise")
            checked += 1
    print(f"gpu_sanitize_case: backend={backend} device={device}: {checked} raise paths ok")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, help="cuda, triton (GPU) or cpp, torch (CPU flow check)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="float32, batch and token only (racecheck is slower)")
    ap.add_argument("--raise-paths", action="store_true", help="check nonfinite='raise' errors instead")
    args = ap.parse_args(argv)
    if args.backend not in pama_ext.available_backends():
        print(f"gpu_sanitize_case: backend {args.backend!r} is not available here: {pama_ext.available_backends()}")
        return 2
    if args.raise_paths:
        return raise_paths(args.backend, args.device)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    grans = ("batch", "token") if args.quick else pama_ext.GRANULARITIES
    count, worst = 0, 0.0
    for (b, t), n, per_seq, gran, dtype in itertools.product(SHAPES, NS, (False, True), grans, dtypes):
        agg = pama_ext.LOSS_AGGS[count % 2]  # both aggregations, alternately (they differ only in the final scale)
        worst = max(worst, one(args.backend, args.device, b, t, n, per_seq, gran, agg, dtype, seed=count))
        count += 1
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"gpu_sanitize_case: backend={args.backend} device={args.device}: {count} cases ok, worst rel err {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
