"""Run the CUDA kernels of csrc/pama_cuda_kernels.cu on CPU, with CUDA's block semantics.

Why: CI machines have no GPU (only nvcc and g++), so nvcc can compile the kernels but nothing
can run them. This module cuts the device part out of the CURRENT csrc/pama_cuda_kernels.cu
(everything before the host "dispatch" section), rewrites its ``__shared__`` declarations
into the block-shared, poisoned, bounds-checked arrays of emu.h, and compiles the kernel
bodies unchanged with g++ into driver.cpp, which runs the reduce and finalise kernels block
by block, each thread a coroutine, under three thread schedules, and checks the results
against a long-double reference (see driver.cpp for the checks, emu.h for what the emulation
models: barriers, full-mask warp shuffles, shared memory; and what it does not: the memory
model of real hardware, nvcc's code generation, concurrent blocks).

Used by python_tests/test_cuda_emulation.py, and as a script for bigger sweeps::

    python csrc/emulation/emulate.py --configs 400 --jobs 2 --seed 7
    python csrc/emulation/emulate.py --sweep --jobs 2     # reduce_kernel_any, N = 1..64

Needs g++ (C++17) and the CUDA headers cuda_runtime.h, cuda_fp16.h, cuda_bf16.h (for the
__half / __nv_bfloat16 host conversions), found through $CUDA_HOME, $CUDA_PATH or nvcc.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
KERNELS_CU = os.path.join(CSRC, "pama_cuda_kernels.cu")
KERNELS_INC = "pama_cuda_kernels.emu.inc"  # the transformed device code, #included by driver.cpp
CUDA_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")

# the comment line that opens the host-side dispatch section: the device code ends there
DISPATCH_MARKER = re.compile(r"^// -+ dispatch\s*$", re.M)
# the namespaces the device code is in; they are closed after the cut
NAMESPACE_OPENERS = ("namespace pama_cuda {", "namespace {")
SHARED_DECL = re.compile(r"^(\s*)__shared__\s+(.*?);(.*)$")
EXTERN_SHARED_DECL = re.compile(r"^(\s*)extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;(.*)$")

DTYPES = ("f64", "f32", "bf16", "f16")
MODES = ("gram", "mean", "min")
LAYOUTS = ("btn", "bn")
# T around the block size (2048 tokens) and the chunk sizes of the kernels
T_VALUES = (0, 1, 2, 3, 5, 7, 16, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 200, 204, 205, 227, 228,
            255, 256, 257, 300, 409, 512, 700, 1000, 1023, 1024, 1025, 2047, 2048, 2049, 2300, 4096, 4097)
T_EDGES = (0, 1, 2047, 2048, 2049)
N_EDGES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64)
B_VALUES = (0, 1, 2, 3, 4, 5, 7, 9, 17, 33)
MAX_WORK = 3_000_000  # B * T * N cap of one config (emulation time)


class EmulationError(RuntimeError):
    pass


def transform(source: str, path: str = KERNELS_CU) -> str:
    """The device part of the kernel source, ready to be #included after emu.h.

    Keeps one output line per input line (a #line directive maps them back to the .cu, so
    compiler messages and the barrier lines emu.h reports name the real file and line)."""
    cut = DISPATCH_MARKER.search(source)
    if cut is None:
        raise EmulationError(
            f"{path}: the dispatch marker (a line matching {DISPATCH_MARKER.pattern!r}, the comment that "
            "opens the host-side launch section) was not found; the emulator keeps only the device code "
            "before it. Restore the marker or update DISPATCH_MARKER in csrc/emulation/emulate.py.")
    device = source[: cut.start()]
    for opener in NAMESPACE_OPENERS:
        if re.search(r"^" + re.escape(opener) + r"\s*$", device, re.M) is None:
            raise EmulationError(f"{path}: expected the line {opener!r} before the dispatch marker (the emulator "
                                 "closes these namespaces after the cut); update NAMESPACE_OPENERS in emulate.py")
    out = [f'#line 1 "{path}"']
    for number, line in enumerate(device.splitlines(), 1):
        ext = EXTERN_SHARED_DECL.match(line)
        if ext:
            indent, type_, name, rest = ext.groups()
            out.append(f"{indent}{type_}* const {name} = reinterpret_cast<{type_}*>(emu::dynamic_shared);{rest}")
            continue
        decl = SHARED_DECL.match(line)
        if decl:
            out.append(_shared_arrays(*decl.groups(), where=f"{path}:{number}"))
            continue
        if "__shared__" in line and not line.lstrip().startswith("//"):
            raise EmulationError(f"{path}:{number}: a __shared__ declaration the emulator cannot rewrite "
                                 f"(one declaration statement per line expected): {line.strip()!r}")
        out.append(line)
    out += ["}  // namespace", "}  // namespace pama_cuda", ""]
    return "\n".join(out)


def _shared_arrays(indent: str, decl: str, rest: str, where: str) -> str:
    """`__shared__ T a[N], b[M];` -> function-local statics emu::SharedArray<T, (N)>, registered."""
    m = re.match(r"((?:unsigned\s+|signed\s+|const\s+)*[\w:]+)\s+(.*)$", decl)
    if m is None:
        raise EmulationError(f"{where}: cannot parse the __shared__ declaration {decl!r}")
    type_, declarators = m.groups()
    parts = []
    for d in re.split(r",(?![^\[]*\])", declarators):  # commas outside [...]
        dm = re.match(r"\s*(\w+)\s*(?:\[(.*)\])?\s*$", d)
        if dm is None:
            raise EmulationError(f"{where}: cannot parse the __shared__ declarator {d.strip()!r}")
        name, extent = dm.groups()
        type_of = f"emu::SharedArray<{type_}, ({extent})>" if extent is not None else type_
        parts.append(f"static {type_of} {name}; EMU_SHARED({name});")
    return indent + " ".join(parts) + rest


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir() -> str | None:
    """A directory holding CUDA_HEADERS: $CUDA_HOME / $CUDA_PATH, else the TOP= line of nvcc's
    dry run (nvcc may be a wrapper script, its own path need not be inside the toolkit)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _nvcc()
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=120)
            top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
            if top:
                roots.append(top.group(1).strip())
        except (OSError, subprocess.SubprocessError):
            pass
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root:
            inc = os.path.join(os.path.realpath(root), "include")
            if all(os.path.exists(os.path.join(inc, h)) for h in CUDA_HEADERS):
                return inc
    return None


def build_command(out_dir: str, kernel_text: str | None = None, cxx: str = "g++", cuda_include: str | None = None,
                  opt: str = "-O2") -> tuple[list[str], str]:
    """Writes the transformed kernels to out_dir; returns (the g++ command, the binary path).
    kernel_text: transformed text to use instead of transform(current .cu) (e.g. a mutant)."""
    cuda_include = cuda_include or cuda_include_dir()
    if cuda_include is None:
        raise EmulationError(f"CUDA headers {', '.join(CUDA_HEADERS)} not found (set CUDA_HOME or put nvcc on PATH)")
    if kernel_text is None:
        with open(KERNELS_CU) as f:
            kernel_text = transform(f.read())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, KERNELS_INC), "w") as f:
        f.write(kernel_text)
    binary = os.path.join(out_dir, "emulated_kernels")
    # -U_FORTIFY_SOURCE: the fortified longjmp rejects jumps between coroutine stacks
    cmd = [cxx, "-std=c++17", opt, "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-iquote", out_dir, "-I", CSRC,
           "-isystem", cuda_include, os.path.join(HERE, "driver.cpp"), "-o", binary]
    return cmd, binary


def build(out_dir: str, kernel_text: str | None = None, **kwargs) -> str:
    cmd, binary = build_command(out_dir, kernel_text, **kwargs)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationError(f"g++ failed ({' '.join(cmd)}):\n{proc.stderr[-6000:]}")
    return binary


def config_line(dtype: str, mode: str, layout: str, force_any: bool, B: int, T: int, n: int, seed: int) -> str:
    return f"{dtype} {mode} {layout} {int(force_any)} {B} {T} {n} {seed}"


def random_configs(count: int, seed: int) -> list[str]:
    """count configs over dtypes, modes, layouts, B, T (block and chunk edges) and N = 1..64;
    reduce_kernel_any forced for half of the [B,T,N] ones. The first ones cover each T edge
    and each dtype / mode / layout once, with N = 1 and 64 among them; B * T * N is capped by
    MAX_WORK."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        T = T_EDGES[k] if k < len(T_EDGES) else rng.choice(T_VALUES)
        n = (1, 64, 3, 33, 8)[k] if k < 5 else (rng.choice(N_EDGES) if rng.random() < 0.5 else rng.randint(1, 64))
        B = rng.choice(B_VALUES)
        if T <= 4 and rng.random() < 1 / 3:
            B = rng.randint(2040, 2160)  # several units of whole rows
        elif T <= 40 and rng.random() < 1 / 3:
            B = rng.randint(60, 260)
        if B * T * n > MAX_WORK:
            B = max(1, MAX_WORK // (T * n + 1))
        dtype = DTYPES[k % 4] if k < 4 else rng.choice(DTYPES)
        mode = MODES[k % 3] if k < 3 else rng.choice(MODES)
        layout = LAYOUTS[k % 2] if k < 2 else ("bn" if rng.random() < 0.25 else "btn")
        force_any = layout == "btn" and rng.random() < 0.5
        out.append(config_line(dtype, mode, layout, force_any, B, T, n, rng.getrandbits(32)))
    return out


def any_kernel_sweep(mode: str, seed: int) -> list[str]:
    """reduce_kernel_any forced for every N = 1..64, T at its chunk edges, both layouts."""
    rng = random.Random(seed)
    out = []
    for n in range(1, 65):
        chunk = min(256, 2048 // n)
        for T in (1, 7, chunk - 1, chunk, chunk + 1, 2 * chunk + 3, 2049):
            for layout in LAYOUTS:
                B = 300 if T <= 7 else 3
                out.append(config_line(DTYPES[(n + T) % 4], mode, layout, True, B, T, n, rng.getrandbits(32)))
    return out


def run(binary: str, configs: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Runs the configs through the emulator; rc 0 iff every config passed."""
    return subprocess.run([binary], input="\n".join(configs) + "\n", capture_output=True, text=True, timeout=timeout)


def summary(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The driver's final counts (configs, failed, finalise_smem_checked); {} if it aborted."""
    m = re.search(r"^summary (.*)$", proc.stdout, re.M)
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())} if m else {}


def describe_failure(proc: subprocess.CompletedProcess) -> str:
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    return (f"emulator exit status {proc.returncode}; failed configs: {failed[:10]}\n"
            f"stderr (tail):\n{proc.stderr[-4000:]}")


def run_parallel(binary: str, configs: list[str], jobs: int) -> list[subprocess.CompletedProcess]:
    shards = [configs[j::jobs] for j in range(jobs)]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda shard: run(binary, shard), [s for s in shards if s]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=200, help="number of random configs (default 200)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="emulator processes in parallel")
    p.add_argument("--sweep", action="store_true", help="instead: reduce_kernel_any for N = 1..64 at its chunk edges, all modes")
    p.add_argument("--build-dir", help="where to build (default: a temporary directory)")
    args = p.parse_args(argv)
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="pama_emu_")
    t0 = time.time()
    binary = build(build_dir)
    print(f"built {binary} in {time.time() - t0:.1f} s", flush=True)
    configs = ([c for mode in MODES for c in any_kernel_sweep(mode, args.seed)] if args.sweep
               else random_configs(args.configs, args.seed))
    t0 = time.time()
    procs = run_parallel(binary, configs, max(1, args.jobs))
    done = sum(summary(pr).get("configs", 0) for pr in procs)
    bad = [pr for pr in procs if pr.returncode != 0]
    for pr in bad:
        print(describe_failure(pr), file=sys.stderr)
    print(f"{done} of {len(configs)} configs run in {time.time() - t0:.1f} s (seed {args.seed}): "
          f"{'FAILED' if bad else 'all passed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
