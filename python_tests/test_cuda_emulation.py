"""Runs the CUDA kernels (csrc/pama_cuda_kernels.cu, as they are now) on CPU under the block
emulator of csrc/emulation/: CI has no GPU, so this is where the kernel bodies are executed.

emulate.py cuts the device code out of the .cu, rewrites its __shared__ arrays (poisoned,
bounds-checked) and compiles the kernel bodies unchanged with g++ -O2; each CUDA thread is a
coroutine, barriers and full-mask warp shuffles have CUDA's semantics. Per config the driver
checks (see csrc/emulation/driver.cpp):
  1. the reduce kernels (launch_reduce's choice, or reduce_kernel_any forced for every N)
     against a long-double reference, on random inputs with +-inf / NaN and empty rows;
  2. bitwise equality of the reduce results under three thread schedules (forward, reverse,
     random): a race or a missing __syncthreads makes them differ;
  3. finalise_kernel: bitwise equal under the three schedules and, for `batch` and
     `sequence_gram` with N >= 3, with the solver scratch in dynamic shared memory and in
     global memory; for `sequence_gram` the weights, objective and KKT residual also against
     a long-double Gram of the per-row means.
Not modelled: the hardware memory model and nvcc's code generation (see emu.h).
A planted bug (one __syncthreads removed from reduce_kernel_any) must make the run fail.

Skipped without g++ or the CUDA headers (found via $CUDA_HOME / nvcc's TOP= line).
PAMA_EMU_CONFIGS / PAMA_EMU_SEED change the number of random configs and the seed; bigger
sweeps: `python csrc/emulation/emulate.py --help`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("pama_cuda_emulate", os.path.join(ROOT, "csrc", "emulation", "emulate.py"))
emulate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = emulate
_spec.loader.exec_module(emulate)

N_CONFIGS = int(os.environ.get("PAMA_EMU_CONFIGS", "300"))  # ~25 s on 2 cores
SEED = int(os.environ.get("PAMA_EMU_SEED", "20251201"))
JOBS = 2

# the planted bug: the barrier between the sub-lane partials (sCb) and their sum in the
# whole-rows path of reduce_kernel_any
PLANTED_KERNEL = "reduce_kernel_any"
PLANTED_BARRIER_COMMENT = "sCb complete"

CXX = shutil.which("g++")
CUDA_INCLUDE = emulate.cuda_include_dir() if CXX else None
needs_build = pytest.mark.skipif(
    CXX is None or CUDA_INCLUDE is None,
    reason="g++ not found" if CXX is None else f"CUDA headers {emulate.CUDA_HEADERS} not found (CUDA_HOME / nvcc)")


def _current_transformed() -> str:
    with open(emulate.KERNELS_CU) as f:
        return emulate.transform(f.read())


def _without_planted_barrier(text: str) -> str:
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if re.search(rf"\b{PLANTED_KERNEL}\s*\(\s*ReduceArgs", l)), None)
    assert start is not None, f"{PLANTED_KERNEL}(ReduceArgs ...) not found in the transformed kernels"
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    barriers = [i for i in range(start, end) if "__syncthreads();" in lines[i]]
    hits = [i for i in barriers if PLANTED_BARRIER_COMMENT in lines[i]]
    assert len(hits) == 1, (
        f"expected one __syncthreads() commented '{PLANTED_BARRIER_COMMENT}' in {PLANTED_KERNEL}; its barriers are: "
        + "; ".join(f"line {i}: {lines[i].strip()}" for i in barriers)
        + " -- pick another barrier for the planted-bug test")
    lines[hits[0]] = lines[hits[0]].replace("__syncthreads();", ";", 1)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """{"kernels": the current kernels, "planted_bug": one barrier removed}, built in parallel."""
    root = tmp_path_factory.mktemp("cuda_emulation")
    texts = {"kernels": _current_transformed(), "planted_bug": _without_planted_barrier(_current_transformed())}
    t0 = time.time()
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = {name: pool.submit(emulate.build, str(root / name), text, cxx=CXX, cuda_include=CUDA_INCLUDE)
                   for name, text in texts.items()}
        out = {name: f.result() for name, f in futures.items()}
    print(f"\nemulator builds (g++ -O2, {len(texts)} in parallel): {time.time() - t0:.1f} s")
    return out


def test_transform_cuts_before_dispatch_and_rewrites_shared():
    with open(emulate.KERNELS_CU) as f:
        source = f.read()
    text = emulate.transform(source)
    code = [l for l in text.splitlines() if not l.lstrip().startswith("//")]
    assert not any("__shared__" in re.sub(r"//.*", "", l) for l in code)
    assert "EMU_SHARED(" in text and "emu::dynamic_shared" in text
    assert "launch_finalise" not in text and "dispatch_dtype" not in text  # host side cut off
    # one line per source line, so emu.h's barrier lines and g++'s messages name the .cu lines
    device_lines = source[: emulate.DISPATCH_MARKER.search(source).start()].count("\n")
    assert len(text.splitlines()) == 1 + device_lines + 2  # #line, the device code, two namespace closers


def test_transform_errors_name_what_is_missing():
    with open(emulate.KERNELS_CU) as f:
        source = f.read()
    without_marker = emulate.DISPATCH_MARKER.sub("// dispatch (renamed)", source)
    with pytest.raises(emulate.EmulationError, match="dispatch marker"):
        emulate.transform(without_marker)
    with pytest.raises(emulate.EmulationError, match="cannot rewrite"):
        emulate.transform("namespace pama_cuda {\nnamespace {\nint f() { __shared__\n double x; }\n"
                          "// ------- dispatch\n")


@needs_build
def test_random_configs_on_current_kernels(binaries):
    configs = emulate.random_configs(N_CONFIGS, SEED)
    fields = [c.split() for c in configs]
    # what the config set covers (the first configs are chosen to cover the edges)
    assert {f[0] for f in fields} == set(emulate.DTYPES) and {f[1] for f in fields} == set(emulate.MODES)
    assert {f[2] for f in fields} == set(emulate.LAYOUTS) and any(f[3] == "1" for f in fields)
    assert set(emulate.T_EDGES) <= {int(f[5]) for f in fields} and {1, 64} <= {int(f[6]) for f in fields}
    t0 = time.time()
    procs = emulate.run_parallel(binaries["kernels"], configs, JOBS)
    elapsed = time.time() - t0
    for proc in procs:
        assert proc.returncode == 0, emulate.describe_failure(proc)
    counts = [emulate.summary(p) for p in procs]
    n_run = sum(c["configs"] for c in counts)
    n_smem = sum(c["finalise_smem_checked"] for c in counts)
    n_sg = sum(c["finalise_sequence_gram_checked"] for c in counts)
    print(f"\nCUDA emulation: {n_run} configs (seed {SEED}, {sum(f[3] == '1' for f in fields)} with reduce_kernel_any "
          f"forced, {n_smem} finalise smem-vs-global comparisons, {n_sg} sequence_gram solves checked) "
          f"passed in {elapsed:.1f} s")
    assert n_run == len(configs)
    assert n_smem > 0, "no config compared the finalise solver in shared vs global memory"
    assert n_sg > 0, "no config checked the sequence_gram finalise against the long-double Gram"


@needs_build
def test_planted_missing_barrier_is_caught(binaries):
    configs = [c for c in emulate.random_configs(200, SEED + 1) if c.split()[2:4] == ["btn", "1"]][:60]
    proc = emulate.run(binaries["planted_bug"], configs)
    failed = [l for l in proc.stdout.splitlines() if l.startswith("FAIL ")]
    print(f"\nplanted bug (no '{PLANTED_BARRIER_COMMENT}' barrier in {PLANTED_KERNEL}): "
          f"{len(failed)} of {len(configs)} configs failed, exit status {proc.returncode}")
    assert proc.returncode != 0 and failed, "the emulator did not detect a removed __syncthreads()"
    assert "differs bitwise from schedule 0" in proc.stderr, "the schedule comparison did not see the race"
