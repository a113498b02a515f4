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
  2b. granularity "token" (mode min): the [B, T] per-token gradient factor the reduce kernels
     write (the forward's weights), every element bitwise equal to the op_t reference
     valid && u <= 1+eps ? s * u : +0 (masked-out, non-finite and clipped tokens exactly 0)
     and across the schedules; also with reduce_kernel_any forced for every N = 1..64 and
     for the broadcast ([B, N]) kernel;
  3. finalise_kernel: bitwise equal under the three schedules and, for `batch` and
     `sequence_gram` with N >= 3, with the solver scratch in dynamic shared memory and in
     global memory; for `sequence_gram` the weights, objective and KKT residual also against
     a long-double Gram of the per-row means.
Not modelled: the hardware memory model and nvcc's code generation (see emu.h).
Planted bugs must make the run fail: one __syncthreads removed from reduce_kernel_any, and
the clip indicator dropped from the token factor (token_factor).

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
# the planted factor bug: token_factor without the clip indicator (a clipped token keeps s * u)
PLANTED_FACTOR_FROM = "return (k.valid && k.ind) ? static_cast<op_t>(mn * k.u) : op_t(0);"
PLANTED_FACTOR_TO = "return k.valid ? static_cast<op_t>(mn * k.u) : op_t(0);"

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


def _without_factor_indicator(text: str) -> str:
    assert text.count(PLANTED_FACTOR_FROM) == 1, (
        f"expected token_factor's body {PLANTED_FACTOR_FROM!r} once in the kernels: update PLANTED_FACTOR_FROM")
    return text.replace(PLANTED_FACTOR_FROM, PLANTED_FACTOR_TO)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """{"kernels": the current kernels, "planted_bug": one barrier removed, "planted_factor_bug":
    the token factor without the clip indicator}, built JOBS at a time."""
    root = tmp_path_factory.mktemp("cuda_emulation")
    texts = {"kernels": _current_transformed(), "planted_bug": _without_planted_barrier(_current_transformed()),
             "planted_factor_bug": _without_factor_indicator(_current_transformed())}
    t0 = time.time()
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {name: pool.submit(emulate.build, str(root / name), text, cxx=CXX, cuda_include=CUDA_INCLUDE)
                   for name, text in texts.items()}
        out = {name: f.result() for name, f in futures.items()}
    print(f"\nemulator builds (g++ -O2, {len(texts)}, {JOBS} in parallel): {time.time() - t0:.1f} s")
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
    n_f = {k: sum(c[k] for c in counts) for k in ("factor_checked", "factor_nonzero", "factor_clipped_zero",
                                                    "factor_invalid_zero")}
    print(f"\nCUDA emulation: {n_run} configs (seed {SEED}, {sum(f[3] == '1' for f in fields)} with reduce_kernel_any "
          f"forced, {n_smem} finalise smem-vs-global comparisons, {n_sg} sequence_gram solves checked, "
          f"token factor: {n_f}) passed in {elapsed:.1f} s")
    assert n_run == len(configs)
    assert n_smem > 0, "no config compared the finalise solver in shared vs global memory"
    assert n_sg > 0, "no config checked the sequence_gram finalise against the long-double Gram"
    assert all(v > 0 for v in n_f.values()), f"the token factor checks did not see every case: {n_f}"


@needs_build
def test_token_factor_every_n(binaries):
    """granularity "token": reduce_kernel_any forced for every N = 1..64 (T at its chunk edges
    and past the block size) and the broadcast kernel, the factor checked element by element."""
    configs = emulate.any_kernel_sweep("min", SEED + 2)
    fields = [c.split() for c in configs]
    assert {int(f[6]) for f in fields} == set(range(1, 65)) and {f[2] for f in fields} == {"btn", "bn"}
    assert all(f[3] == "1" for f in fields if f[2] == "btn")
    t0 = time.time()
    procs = emulate.run_parallel(binaries["kernels"], configs, JOBS)
    for proc in procs:
        assert proc.returncode == 0, emulate.describe_failure(proc)
    counts = [emulate.summary(p) for p in procs]
    n_run = sum(c["configs"] for c in counts)
    n_f = {k: sum(c[k] for c in counts) for k in ("factor_checked", "factor_nonzero", "factor_clipped_zero",
                                                    "factor_invalid_zero")}
    print(f"\ntoken factor, every N: {n_run} configs, {n_f}, passed in {time.time() - t0:.1f} s")
    assert n_run == len(configs) and all(v > 0 for v in n_f.values()), n_f


@needs_build
def test_planted_missing_barrier_is_caught(binaries):
    configs = [c for c in emulate.random_configs(200, SEED + 1) if c.split()[2:4] == ["btn", "1"]][:60]
    proc = emulate.run(binaries["planted_bug"], configs)
    failed = [l for l in proc.stdout.splitlines() if l.startswith("FAIL ")]
    print(f"\nplanted bug (no '{PLANTED_BARRIER_COMMENT}' barrier in {PLANTED_KERNEL}): "
          f"{len(failed)} of {len(configs)} configs failed, exit status {proc.returncode}")
    assert proc.returncode != 0 and failed, "the emulator did not detect a removed __syncthreads()"
    assert "differs bitwise from schedule 0" in proc.stderr, "the schedule comparison did not see the race"


@needs_build
def test_planted_factor_without_indicator_is_caught(binaries):
    """token_factor without the clip indicator: every reduce kernel (reduce_kernel_nt,
    reduce_kernel_any forced, reduce_kernel_bc) must fail on the clipped tokens."""
    configs = [c for c in emulate.random_configs(300, SEED + 3) if c.split()[1] == "min"]
    configs += [c for c in emulate.any_kernel_sweep("min", SEED + 4) if c.split()[6] in ("5", "64")]
    proc = emulate.run(binaries["planted_factor_bug"], configs)
    failed = [l.split()[1:] for l in proc.stdout.splitlines() if l.startswith("FAIL ")]
    kinds = {("bc" if f[2] == "bn" else "any" if f[3] == "1" or int(f[6]) not in (1, 2, 3, 4, 8) else "nt")
             for f in failed}
    print(f"\nplanted factor bug (token_factor without the indicator): {len(failed)} of {len(configs)} configs "
          f"failed ({sorted(kinds)}), exit status {proc.returncode}")
    assert proc.returncode != 0 and failed, "the emulator did not detect the token factor without the clip indicator"
    assert kinds == {"bc", "any", "nt"}, f"only these kernels were caught: {kinds}"
    assert "token factor [" in proc.stderr and "clipped 1" in proc.stderr
