"""How many kernels would the Triton JIT compile over a sweep of shapes? (no GPU needed)

Triton specialises each launch on its int arguments (an int equal to 1 becomes a
compile-time constant, a multiple of 16 gets a divisibility attribute) unless the kernel
lists them in ``do_not_specialize``; every distinct specialisation is one compile
(0.5-4 s on a GPU host). This script records the launches the Triton backend's host code
makes (``pama_ext.triton_backend.specialise.host_launches``, nothing runs) for T = 100..4096 and a
few batch sizes, both advantage layouts and both loss aggregations, applies Triton's own
binder for sm_90 (``specialise.jit_key``) and prints the number of distinct compiled variants per
(dtype, N, granularity), with the kernels' ``do_not_specialize`` lists and without them
(which is what the kernels compiled before the lists were added)::

    python benchmarks/triton_variants.py                 # T = 100..4096 step 7
    python benchmarks/triton_variants.py --t-step 1 --ns 1,2,3,5,8,16,64

python_tests/test_triton_aot.py asserts the "with" column is one per kernel.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels' JIT, not the interpreter

import torch  # noqa: E402

from pama_ext.triton_backend import specialise  # noqa: E402

GRANULARITIES = ("batch", "token", "sequence", "batch_mean", "sequence_gram")
AGGS = ("token_mean", "seq_mean_token_mean")
BATCHES = (1, 3, 16, 64, 257)


def sweep(dtype, n, gran, ts, respect):
    keys = collections.defaultdict(set)
    for i, t in enumerate(ts):
        b = BATCHES[i % len(BATCHES)]
        if b * t * (n if i % 3 else 1) > 2**22:  # keep the (never read) inputs small
            b = 16
        for launch in specialise.host_launches(dtype, n, gran, b=b, t=t, loss_agg=AGGS[i % 2], per_token_advantages=i % 3 != 0):
            keys[launch.name].add(specialise.jit_key(launch, respect))
    return keys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1,2,3,5,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--t-min", type=int, default=100)
    ap.add_argument("--t-max", type=int, default=4096)
    ap.add_argument("--t-step", type=int, default=7)
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    ts = sorted(set(range(args.t_min, args.t_max + 1, args.t_step)) | {args.t_max})
    print(f"T = {args.t_min}..{args.t_max}, {len(ts)} lengths, B cycling {BATCHES}; sm_90 JIT keys per kernel")
    print(f"{'dtype':<9} {'N':>3} {'granularity':<13} {'variants (with lists)':>22} {'(without lists)':>16}   per kernel without")
    tot_with = tot_without = configs = 0
    t0 = time.time()
    for dtype in dtypes:
        for n in ns:
            for gran in GRANULARITIES:
                w = sweep(dtype, n, gran, ts, True)
                wo = sweep(dtype, n, gran, ts, False)
                a, b = sum(map(len, w.values())), sum(map(len, wo.values()))
                tot_with, tot_without, configs = tot_with + a, tot_without + b, configs + 1
                per = " ".join(f"{k.replace('_kernel', '')}={len(v)}" for k, v in wo.items())
                flag = "" if all(len(v) == 1 for v in w.values()) else "  <-- more than one per kernel"
                print(f"{str(dtype)[6:]:<9} {n:>3} {gran:<13} {a:>22} {b:>16}   {per}{flag}")
    print(f"total over {configs} (dtype, N, granularity): {tot_with} compiled kernels with the lists, "
          f"{tot_without} without ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
