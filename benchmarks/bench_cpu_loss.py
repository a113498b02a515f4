"""CPU benchmark of the PAMA loss, forward + backward: fused C++ op vs eager PyTorch.

Run the benchmarks (pytest-benchmark; a group per size, N and granularity, so the
table's ratio columns compare the implementations on the same inputs)::

    .venv/bin/python -m pytest benchmarks/bench_cpu_loss.py --benchmark-only

Run them and print / save the ratio table (``benchmarks/results/cpu_loss.json``)::

    .venv/bin/python benchmarks/bench_cpu_loss.py            # runs pytest, then summarises
    .venv/bin/python benchmarks/bench_cpu_loss.py --from-json FILE   # summarise a saved run

Implementations: ``cpp`` (``pama_loss(backend='cpp')``, skipped when the extension is not
built), ``torch`` (``pama_loss(backend='torch')``, the library's readable eager backend)
and ``lean_eager`` (``eager_baselines.lean_pama_loss``, granularity='batch' only; checked
against ``pama_loss`` to 1e-4 relative before it is timed).

Every timed call is ``loss = f(logp, ...); loss.backward()`` with ``logp.requires_grad``.
Peak memory (``extra_info['peak_bytes']``) is measured in a fresh subprocess: the
high-water mark of the resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
just before the call) minus the resident set before it, with glibc told to mmap every
allocation of 64 KiB or more (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave
the resident set and the mark counts live bytes. It is the memory the call needs on top of
its inputs, the returned gradient included. Set ``PAMA_BENCH_PEAK=0`` to skip it.

The summary's ratios compare the fastest round of each implementation (``min_s``; the
median ratios are in the JSON too): on a shared 2-core machine other jobs inflate the
median far more than the minimum. ``PAMA_BENCH_THREADS=1`` runs single-threaded (the
default is torch's, i.e. one thread per core).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `python benchmarks/bench_cpu_loss.py` and the peak subprocess
    sys.path.insert(0, str(HERE))

import pama_ext  # noqa: E402
from eager_baselines import check_lean_against_pama, lean_pama_loss, make_inputs  # noqa: E402

if os.environ.get("PAMA_BENCH_THREADS"):  # e.g. 1 for timings that survive other jobs on the cores
    torch.set_num_threads(int(os.environ["PAMA_BENCH_THREADS"]))

SIZES = {"64k": (64, 1024), "1M": (256, 4096)}
NS = (2, 4, 8)
METHODS = ("cpp", "torch", "lean_eager")
# rounds per size; the readable torch backend is 5-30x slower, so it gets fewer
ROUNDS = {"64k": 20, "1M": 10}
ROUNDS_TORCH = {"64k": 10, "1M": 4}
WARMUP = {"64k": 3, "1M": 1}
RESULTS = HERE / "results" / "cpu_loss.json"


def _cases():
    cases = [(size, n, "batch", method) for size in SIZES for n in NS for method in METHODS]
    cases += [("1M", 4, gran, method) for gran in ("token", "sequence") for method in ("cpp", "torch")]
    return cases


CASES = _cases()


def group_name(size: str, n: int, gran: str) -> str:
    return f"{size} N={n} {gran}"


@functools.lru_cache(maxsize=None)
def inputs_for(size: str, n: int):
    b, t = SIZES[size]
    return make_inputs(b, t, n, seed=1234 + n)


def loss_fn(method: str, granularity: str):
    if method == "lean_eager":
        assert granularity == "batch"
        return lean_pama_loss
    return functools.partial(pama_ext.pama_loss, granularity=granularity, backend=method)


# --------------------------------------------------------------------------- peak memory
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_child(size: str, n: int, granularity: str, method: str) -> dict:
    """In a fresh process: extra resident bytes at the peak of one forward + backward."""
    x = inputs_for(size, n)
    fn = loss_fn(method, granularity)
    logp = x["logp"].clone().requires_grad_(True)

    def once():
        fn(logp, x["old_logp"], x["advantages"], x["mask"]).backward()

    once()  # warm-up: lazy initialisation, thread pool, code pages
    logp.grad = None
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        how = "VmHWM after /proc/self/clear_refs"
    except OSError:
        how = "ru_maxrss (warm-up included)"
    rss0 = _proc_status("VmRSS")
    once()
    if how.startswith("VmHWM"):
        hwm = _proc_status("VmHWM")
    else:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": max(0, hwm - rss0), "peak_method": how}


def measure_peak(size: str, n: int, granularity: str, method: str):
    if os.environ.get("PAMA_BENCH_PEAK", "1") == "0":
        return None
    threads = str(torch.get_num_threads())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=threads, PAMA_BENCH_THREADS=threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-child", size, str(n), granularity, method]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmarks
@functools.lru_cache(maxsize=None)
def _checked(size: str, n: int) -> dict:
    """The lean baseline must compute the library's loss before its time means anything."""
    return check_lean_against_pama(inputs_for(size, n), rtol=1e-4, backend="torch")


@pytest.mark.parametrize(
    "size,n,granularity,method",
    [pytest.param(*c, id=f"{c[0]}-N{c[1]}-{c[2]}-{c[3]}") for c in CASES],
)
def test_pama_loss_fwd_bwd(benchmark, size, n, granularity, method):
    if method not in pama_ext.available_backends() and method != "lean_eager":
        pytest.skip(f"backend {method!r} not available (pama_ext.build_info(): {pama_ext.build_info()['extension_error']})")
    benchmark.group = group_name(size, n, granularity)
    x = inputs_for(size, n)
    b, t = SIZES[size]
    info = {
        "size": size,
        "B": b,
        "T": t,
        "N": n,
        "granularity": granularity,
        "method": method,
        "tokens": b * t,
        "masked_tokens": int(x["mask"].sum()),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
    }
    if method == "lean_eager":
        info["check_vs_pama_loss"] = _checked(size, n)
    fn = loss_fn(method, granularity)
    logp = x["logp"].clone().requires_grad_(True)
    old_logp, adv, mask = x["old_logp"], x["advantages"], x["mask"]

    def setup():
        logp.grad = None

    def run():
        fn(logp, old_logp, adv, mask).backward()

    rounds = (ROUNDS_TORCH if method == "torch" else ROUNDS)[size]
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=WARMUP[size])
    assert logp.grad is not None and bool(torch.isfinite(logp.grad).all())
    peak = measure_peak(size, n, granularity, method)
    if peak is not None:
        info.update(peak)
    benchmark.extra_info.update(info)


# --------------------------------------------------------------------------- summary
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def summarise(bench_json: dict) -> dict:
    """Ratios per (size, N, granularity) from a pytest-benchmark JSON."""
    rows = {}
    for bm in bench_json["benchmarks"]:
        e = bm["extra_info"]
        key = (e["size"], e["N"], e["granularity"])
        row = rows.setdefault(key, {"size": e["size"], "B": e["B"], "T": e["T"], "N": e["N"], "granularity": e["granularity"], "methods": {}})
        row["methods"][e["method"]] = {
            "median_s": bm["stats"]["median"],
            "mean_s": bm["stats"]["mean"],
            "min_s": bm["stats"]["min"],
            "rounds": bm["stats"]["rounds"],
            "peak_bytes": e.get("peak_bytes"),
        }
    order = {s: i for i, s in enumerate(SIZES)}
    out = []
    for key in sorted(rows, key=lambda k: (k[2] != "batch", order.get(k[0], 99), k[1], k[2])):
        row = rows[key]
        ms = row["methods"]
        for a, b in (("torch", "cpp"), ("lean_eager", "cpp"), ("torch", "lean_eager")):
            if a in ms and b in ms:
                row[f"{a}/{b}"] = ms[a]["min_s"] / ms[b]["min_s"]
                row[f"{a}/{b} (median)"] = ms[a]["median_s"] / ms[b]["median_s"]
                pa, pb = ms[a]["peak_bytes"], ms[b]["peak_bytes"]
                row[f"{a}/{b} peak"] = (pa / pb) if pa is not None and pb else None
        out.append(row)
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "pama_ext_backends": pama_ext.available_backends(),
        },
        "datetime": bench_json.get("datetime"),
        "git_head": _git_head(),
        "timing": "forward + backward, float32; ratios of the fastest round (min_s), median ratios alongside",
        "rows": out,
    }


def format_table(summary: dict) -> str:
    def ms(row, m):
        v = row["methods"].get(m)
        return f"{v['min_s'] * 1e3:.2f}" if v else "-"

    def mb(row, m):
        v = row["methods"].get(m)
        return f"{v['peak_bytes'] / 2**20:.1f}" if v and v.get("peak_bytes") is not None else "-"

    def ratio(row, k):
        v = row.get(k)
        return f"{v:.2f}x" if v is not None else "-"

    head = (
        "| size | N | granularity | cpp ms | torch ms | lean eager ms | torch/cpp | lean/cpp | torch/lean "
        "| peak cpp MiB | peak torch MiB | peak lean MiB |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in summary["rows"]:
        lines.append(
            f"| {r['size']} ({r['B']}x{r['T']}) | {r['N']} | {r['granularity']} | {ms(r, 'cpp')} | {ms(r, 'torch')} "
            f"| {ms(r, 'lean_eager')} | {ratio(r, 'torch/cpp')} | {ratio(r, 'lean_eager/cpp')} "
            f"| {ratio(r, 'torch/lean_eager')} | {mb(r, 'cpp')} | {mb(r, 'torch')} | {mb(r, 'lean_eager')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-json", help="summarise this pytest-benchmark JSON instead of running the benchmarks")
    p.add_argument("--out", default=str(RESULTS), help="where to write the summary JSON (default: %(default)s)")
    p.add_argument("--peak-child", nargs=4, metavar=("SIZE", "N", "GRANULARITY", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        size, n, gran, method = args.peak_child
        print(json.dumps(_peak_child(size, int(n), gran, method)))
        return 0
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            raw_path = Path(tmp) / "raw.json"
            rc = pytest.main(
                [str(Path(__file__).resolve()), "--benchmark-only", f"--benchmark-json={raw_path}", "-q"]
            )
            if rc != 0 or not raw_path.exists():
                print(f"benchmark run failed (pytest exit code {int(rc)})", file=sys.stderr)
                return int(rc) or 1
            raw = json.loads(raw_path.read_text())
    summary = summarise(raw)
    if not args.from_json:
        summary["wall_s"] = time.perf_counter() - t0
        summary["loadavg_before"] = load_before
        summary["loadavg_after"] = os.getloadavg()
    table = format_table(summary)
    summary["table_markdown"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(table)
    print(f"\nwritten: {out}" + (f" (benchmark run {summary['wall_s']:.0f} s)" if "wall_s" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
