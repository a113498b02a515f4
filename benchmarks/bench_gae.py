"""CPU benchmark of per-objective GAE: the C++ kernel vs the PyTorch reference.

Run the benchmarks (pytest-benchmark; one group per shape, so the table's ratio column
compares the two implementations on the same inputs)::

    .venv/bin/python -m pytest benchmarks/bench_gae.py --benchmark-only

Run them and print the ratio table (``--out FILE`` also writes it as JSON)::

    .venv/bin/python benchmarks/bench_gae.py

Implementations: ``cpp`` (``pama_ext._C.gae``; until csrc/gae_cpu.cpp is wired into the
extension, the same source compiled alone with ``torch.utils.cpp_extension.load``, cached
in the temp directory) and ``torch`` (``pama_ext.rl.gae_reference``: vectorised over rows
and objectives, a Python loop over T). One timed call computes advantages and returns
for float32 [B, T, N] inputs with ragged rows (each response fills 80-100% of T).
Ratios compare the fastest rounds (``min_s``): on a shared machine other jobs inflate
medians far more than minima. ``PAMA_BENCH_THREADS=1`` runs single-threaded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pama_ext import _backends
from pama_ext.rl import gae_reference

if os.environ.get("PAMA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PAMA_BENCH_THREADS"]))

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
SHAPES = {"16k": (64, 256), "256k": (256, 1024)}  # name: (B, T)
NS = (1, 4, 8)
CASES = [("16k", 4)] + [("256k", n) for n in NS]
METHODS = ("cpp", "torch")
ROUNDS = {"cpp": 30, "torch": 5}
GAMMA, LAM = 1.0, 0.95


@functools.lru_cache(maxsize=None)
def cpp_kernel():
    """``pama_ext._C.gae``, or csrc/gae_cpu.cpp built alone (None if it cannot be built)."""
    if _backends._C is not None and hasattr(_backends._C, "gae"):
        return _backends._C.gae
    from torch.utils.cpp_extension import load

    build = Path(tempfile.gettempdir()) / f"pama_gae_scratch_torch{torch.__version__.replace('+', '_')}"
    build.mkdir(parents=True, exist_ok=True)
    src = build / "gae_module.cpp"
    text = '#include "bindings.h"\n#include "cpu_ops.h"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gae", &pama_cpu_ops::gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam")); }\n'
    if not src.exists() or src.read_text() != text:
        src.write_text(text)
    try:
        module = load(
            name="pama_gae_scratch",
            sources=[str(src), str(CSRC / "gae_cpu.cpp")],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            build_directory=str(build),
        )
    except Exception as exc:  # pragma: no cover - no compiler
        print(f"bench_gae: cannot build csrc/gae_cpu.cpp: {exc}", file=sys.stderr)
        return None
    return module.gae


@functools.lru_cache(maxsize=None)
def inputs_for(shape: str, n: int):
    b, t = SHAPES[shape]
    gen = torch.Generator().manual_seed(4321 + n)
    rewards = torch.randn(b, t, n, generator=gen)
    values = torch.randn(b, t, n, generator=gen)
    lengths = (t * (0.8 + 0.2 * torch.rand(b, generator=gen))).long()
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return rewards, values, mask


def gae_fn(method: str):
    if method == "cpp":
        return cpp_kernel()
    return gae_reference


@pytest.mark.parametrize(
    "shape,n,method", [pytest.param(s, n, m, id=f"{s}-N{n}-{m}") for s, n in CASES for m in METHODS]
)
def test_gae(benchmark, shape, n, method):
    fn = gae_fn(method)
    if fn is None:
        pytest.skip("the C++ kernel could not be built")
    r, v, m = inputs_for(shape, n)
    b, t = SHAPES[shape]
    benchmark.group = f"{shape} ({b}x{t}) N={n}"
    info = {"shape": shape, "B": b, "T": t, "N": n, "method": method, "dtype": "float32"}
    benchmark.extra_info.update(info, threads=torch.get_num_threads(), masked_tokens=int(m.sum()))
    adv, _ = benchmark.pedantic(lambda: fn(r, v, m, GAMMA, LAM), rounds=ROUNDS[method], iterations=1, warmup_rounds=1)
    assert adv.shape == (b, t, n) and bool(torch.isfinite(adv).all())


def summarise(raw: dict) -> list:
    rows = {}
    for bm in raw["benchmarks"]:
        e = bm["extra_info"]
        row = rows.setdefault((e["shape"], e["N"]), {"B": e["B"], "T": e["T"], "N": e["N"]})
        row.setdefault("min_s", {})
        row.setdefault("median_s", {})
        row["min_s"][e["method"]] = bm["stats"]["min"]
        row["median_s"][e["method"]] = bm["stats"]["median"]
    out = []
    for key in sorted(rows, key=lambda k: (SHAPES[k[0]][0] * SHAPES[k[0]][1], k[1])):
        row = rows[key]
        if {"cpp", "torch"} <= set(row["min_s"]):
            row["torch/cpp"] = row["min_s"]["torch"] / row["min_s"]["cpp"]
            row["torch/cpp (median)"] = row["median_s"]["torch"] / row["median_s"]["cpp"]
        out.append(row)
    return out


def format_table(rows: list) -> str:
    lines = ["| B x T | N | cpp ms | torch ms | torch/cpp |", "|---|---|---|---|---|"]
    for r in rows:
        cpp, tor = r["min_s"].get("cpp"), r["min_s"].get("torch")
        ratio = r.get("torch/cpp")
        lines.append(
            f"| {r['B']}x{r['T']} | {r['N']} | {cpp * 1e3:.2f} | {tor * 1e3:.1f} | {ratio:.1f}x |"
            if cpp and tor
            else f"| {r['B']}x{r['T']} | {r['N']} | - | - | - |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the summary as JSON here")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        rc = pytest.main([str(Path(__file__).resolve()), "--benchmark-only", f"--benchmark-json={raw_path}", "-q"])
        if rc != 0 or not raw_path.exists():
            print(f"benchmark run failed (pytest exit code {int(rc)})", file=sys.stderr)
            return int(rc) or 1
        raw = json.loads(raw_path.read_text())
    rows = summarise(raw)
    table = format_table(rows)
    print()
    print(table)
    if args.out:
        summary = {
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "timing": "per_objective GAE, float32, ratios of the fastest round (min_s)",
            "rows": rows,
            "table_markdown": table,
        }
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
