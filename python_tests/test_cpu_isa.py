"""The CPU kernels' instruction-set dispatch (csrc/pama_cpu_kernels.h compiled per ISA).

On x86-64 with GCC the extension holds the hot loops three times (baseline x86-64, AVX2 +
FMA, AVX-512) and picks the best the CPU runs; ``PAMA_EXT_CPU_ISA`` forces one (read at
every call). Tested here: ``build_info`` reports the sets, the forced one is used, a set
the CPU lacks is never used, a bad value is refused, and every set this CPU runs gives the
baseline's results to float tolerance (the vector paths change summation order only), for
every granularity, several N (specialised and generic), dtypes, both advantage layouts,
and each path is bitwise deterministic across thread counts.
"""

from __future__ import annotations

import importlib

import pytest
import torch

_C = importlib.import_module("pama_ext._C")  # not importorskip: a missing build must fail

from test_cpp_kernels import EPS, GRANULARITIES, make_inputs  # noqa: E402

INFO = dict(_C.build_info())
ORDER = ["baseline", "avx2", "avx512"]
RUNNABLE = [i for i in INFO["cpu_isa_compiled"] if ORDER.index(i) <= ORDER.index(INFO["cpu_isa_best"])]
VECTOR = [i for i in RUNNABLE if i != "baseline"]


def _run(isa, monkeypatch, lp, olp, adv, mask, gran, agg="token_mean"):
    monkeypatch.setenv("PAMA_EXT_CPU_ISA", isa)
    assert _C.build_info()["cpu_isa"] == isa
    out = _C.pama_forward(lp, olp, adv, mask, EPS, gran, agg, False)
    go = torch.tensor(1.0, dtype=out[0].dtype)
    g = _C.pama_backward(go, lp, olp, adv, mask, out[1], out[2], EPS, gran)
    return (*out, g)


def test_build_info_reports_the_instruction_sets(monkeypatch):
    assert INFO["cpu_isa_compiled"][0] == "baseline"
    assert set(INFO["cpu_isa_compiled"]) <= set(ORDER)
    assert INFO["cpu_isa_best"] in INFO["cpu_isa_compiled"]
    monkeypatch.delenv("PAMA_EXT_CPU_ISA", raising=False)
    assert _C.build_info()["cpu_isa"] == INFO["cpu_isa_best"]  # every N: the best set
    assert _C.build_info()["cpu_isa_large_n"] == INFO["cpu_isa_best"]
    monkeypatch.setenv("PAMA_EXT_CPU_ISA", "baseline")
    assert _C.build_info()["cpu_isa"] == "baseline"
    # a set the CPU (or the build) lacks falls back to the best available, never SIGILL
    monkeypatch.setenv("PAMA_EXT_CPU_ISA", "avx512")
    assert _C.build_info()["cpu_isa"] == ("avx512" if "avx512" in RUNNABLE else INFO["cpu_isa_best"])
    monkeypatch.setenv("PAMA_EXT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="PAMA_EXT_CPU_ISA must be auto, baseline, avx2 or avx512, got 'sse9'"):
        _C.build_info()


@pytest.mark.skipif(not VECTOR, reason="this CPU or build has only the baseline kernels")
@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 8, 12, 17])  # runtime N: 4-, 8- and 1-column transposes
@pytest.mark.parametrize("dtype, bc", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                       (torch.float32, True), (torch.float16, True)])
def test_vector_paths_equal_the_baseline(isa, N, dtype, bc, monkeypatch):
    lp, olp, adv, mask = make_inputs(7, 700, N, dtype, bc=bc, mask_kind="random", seed=N)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for gran in GRANULARITIES:
        for agg in ("token_mean", "seq_mean_token_mean"):
            base = _run("baseline", monkeypatch, lp, olp, adv, mask, gran, agg)
            vec = _run(isa, monkeypatch, lp, olp, adv, mask, gran, agg)
            for name, x, y in zip(("loss", "weights", "row_scale", "stats", "grad"), base, vec):
                x, y = x.double(), y.double()
                scale = float(x.abs().max()) if x.numel() else 0.0
                tol = rtol * max(scale, 1.0) if name != "stats" else 1e-9 * max(scale, 1.0)
                assert float((x - y).abs().max() if x.numel() else 0.0) <= tol, (isa, gran, agg, name)


@pytest.mark.skipif(not VECTOR, reason="this CPU or build has only the baseline kernels")
@pytest.mark.parametrize("isa", VECTOR)
def test_vector_paths_are_deterministic_across_thread_counts(isa, monkeypatch):
    lp, olp, adv, mask = make_inputs(5, 5000, 5, torch.float32, bc=False, mask_kind="random", seed=3)
    prev = torch.get_num_threads()
    try:
        for gran in GRANULARITIES:
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(_run(isa, monkeypatch, lp, olp, adv, mask, gran, "seq_mean_token_mean"))
            for other in results[1:]:
                for x, y in zip(results[0], other):
                    assert x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), (isa, gran)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(RUNNABLE), reason="this CPU or build lacks AVX2 or AVX-512")
def test_avx512_ratio_has_the_bits_of_the_avx2_exp(monkeypatch):
    # The AVX-512 file computes the ratio u = exp(logp - old_logp) with its own 16-lane loop
    # (exp_f32_x16: one vscalefps for the 2^n step); the AVX2 file compiles exp_f32 itself,
    # FMAs and all. They must agree bit for bit, over the whole range: overflow (u = inf),
    # subnormal and zero results, and the tokens of a chunk past its last full 16 (T odd).
    # With every advantage 1 and a clip range no ratio reaches, `token`'s forward factor is u
    # (0 where u = inf fails the clip test) and its backward is -u / M.
    g = torch.Generator().manual_seed(7)
    B, T = 64, 1013
    x = torch.empty(B, T).uniform_(-125.0, 100.0, generator=g)
    x.view(-1)[:12] = torch.tensor([0.0, -0.0, 88.72, 88.73, 89.0, 89.5, -103.97, -104.0, -104.5, -87.34, 1e-30, -1e-30])
    y = torch.randn(B, T, generator=g) * torch.rand(B, T, generator=g) * 3.0
    lp, olp = x + y, y  # logp - old_logp rounds to about x: a second rounding pattern
    adv = torch.ones(B, T, 2)
    mask = torch.ones(B, T, dtype=torch.bool)
    outs = {}
    for isa in ("avx2", "avx512"):
        monkeypatch.setenv("PAMA_EXT_CPU_ISA", isa)
        f = _C.pama_forward(lp, olp, adv, mask, 1e30, "token", "token_mean", False)[1]
        go = torch.tensor(1.0)
        gr = _C.pama_backward(go, lp, olp, adv, mask, torch.zeros(0), torch.full((B,), 1.0 / (B * T)), 1e30, "token")
        outs[isa] = (f, gr)
    for a, b in zip(outs["avx2"], outs["avx512"]):
        assert a.view(torch.int32).equal(b.view(torch.int32))
    f = outs["avx512"][0]
    assert (f > 0).any() and (f == 0).any() and ((f > 0) & (f < torch.finfo(torch.float32).tiny)).any()


@pytest.mark.skipif("avx512" not in RUNNABLE, reason="this CPU or build lacks AVX-512")
def test_avx512_exp_equals_exp_f32_on_every_float(tmp_path):
    # exp_f32_x16 replaces exp_f32's two half-multiplies by 2^n with one vscalefps; that must
    # give the same bits for all 2^32 inputs. Compiled as setup.py compiles the kernels
    # (g++, -O3 -fno-trapping-math, the AVX-512 file's pragma), then run (about 20 s).
    import shutil
    import subprocess
    from pathlib import Path

    from torch.utils import cpp_extension

    if shutil.which("g++") is None:
        pytest.skip("no g++")
    here = Path(__file__).resolve().parent
    exe = tmp_path / "exp_check"
    torch_lib = Path(torch.__file__).parent / "lib"
    cmd = ["g++", "-std=c++17", "-O3", "-fno-trapping-math", *[f"-I{p}" for p in cpp_extension.include_paths()],
           f"-I{here.parent / 'csrc'}", str(here / "exp_avx512_check.cpp"), "-o", str(exe),
           f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "0 of 2^32 inputs differ", res.stdout
