"""Every Triton kernel compiles ahead of time for sm_90 (Hopper), as the JIT specialises it.

``triton.compile`` with a ``GPUTarget("cuda", 90, 32)`` runs the whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, and a cubin from the ptxas bundled with Triton), so a kernel that
the interpreter runs but the compiler rejects fails here, on a CPU-only CI.

What is compiled is what ``JITFunction.run`` would compile on a GPU: the launches the host
code (``pama_ext/triton_backend/ops.py``) really makes, recorded, then specialised by
Triton's own binder for a CUDA target (``specialise.jit_specialisation``): an int argument equal
to 1 becomes a compile-time constant (N = 1 is one), ints divisible by 16 and 16-byte
aligned pointers get a divisibility attribute, except for the arguments a kernel lists in
``do_not_specialize`` (``do_not_specialize_on_alignment``: no attribute, but 1 is still a
constant).

* ``test_kernel_compiles_for_sm90``: every distinct specialisation for 1 <= N <= 64, every
  granularity and every input dtype (``specialise.specialisations()``).
* ``test_real_launches_compile_for_sm90``: real calls of ``pama_loss`` /
  ``pama_loss_and_stats`` with ``backend="triton"`` (forward and backward), run by Triton's
  interpreter in a worker process, for N = 1, 2, 3, 5, 8, odd shapes, every granularity and
  aggregation, float32 and bfloat16: their launches specialise exactly as the
  enumeration's, and each compiles.
* ``test_shape_sweep_is_one_variant_per_config``: a sweep of T = 100..4096 (and B, both
  advantage layouts, both aggregations) yields one compiled variant per kernel, dtype, N
  and granularity: training does not recompile when the padded length changes.

The compiles run in parallel worker processes (Triton's on-disk cache makes reruns fast);
the interpreter's calls and the sweep run meanwhile in one more worker.
"""

from __future__ import annotations

import collections
import importlib.util
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

KERNELS = [
    "reduce_tokens_kernel",
    "reduce_rows_kernel",
    "reduce_total_kernel",
    "support_candidates_kernel",
    "finalize_kernel",
    "backward_kernel",
]
ARCH = 90
NS = (1, 2, 3, 5, 8)  # the real calls and the sweep
GRANULARITIES = ("batch", "token", "sequence", "batch_mean", "sequence_gram")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")
# odd shapes of the real calls: (B, T, per-token advantages)
REAL_SHAPES = ((3, 37, True), (1, 1, True), (2, 16, False), (5, 19, True), (1, 130, False))
# the sweep: T = 100..4096 (every 47th, powers of two and their neighbours, a few short ones)
SWEEP_T = sorted(set(range(100, 4097, 47)) | {1, 2, 16, 17, 127, 128, 129, 256, 1023, 1024, 2048, 4095, 4096})
SWEEP_B = (1, 3, 16, 64, 257)


def _compiled_mode():
    os.environ.pop("TRITON_INTERPRET", None)  # compiled mode (libdevice exp), whatever the caller set


def _interpreter_mode():
    os.environ["TRITON_INTERPRET"] = "1"  # before the worker imports Triton


def _triton_compile(launch, spec):
    """``triton.compile`` of one launch for sm_90, with the JIT's specialisation ``spec``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pama_ext.triton_backend import kernels

    return triton.compile(
        ASTSource(getattr(kernels, launch.name), spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
        target=GPUTarget("cuda", ARCH, 32),
        options=spec.options,
    )


def _compile(launch):
    """Compile one launch as the JIT would on sm_90 (in a worker process); None or the error."""
    from pama_ext.triton_backend import specialise

    spec = specialise.jit_specialisation(launch, arch=ARCH)
    try:
        compiled = _triton_compile(launch, spec)
    except Exception as exc:  # the compiler's message, shortened
        names = list(spec.signature)
        const = {names[k[0]]: v for k, v in spec.constexprs.items()}
        return (
            f"{launch.name} constexprs {const} num_warps={spec.options['num_warps']}:\n"
            f"{type(exc).__name__}: {str(exc)[-1500:]}"
        )
    if not compiled.asm.get("cubin"):
        return f"{launch.name} {launch.kwargs}: no cubin"
    return None


def _real_launches():
    """(In a TRITON_INTERPRET=1 worker.) Real calls through the public API, run by the
    interpreter, with the launches recorded: [(dtype name, N, granularity, Launch)]."""
    import torch

    import pama_ext
    from pama_ext.triton_backend import specialise

    out = []
    i = 0
    for dtype in (torch.float32, torch.bfloat16):
        for n in NS:
            for gran in GRANULARITIES:
                for agg in LOSS_AGGS if n == 1 else (LOSS_AGGS[i % 2],):
                    b, t, per_token = REAL_SHAPES[i % len(REAL_SHAPES)]
                    i += 1
                    g = torch.Generator().manual_seed(i)
                    logp = (-torch.rand((b, t), generator=g) - 0.1).to(dtype).requires_grad_()
                    old = (logp.detach().float() + 0.3 * torch.randn((b, t), generator=g)).to(dtype)
                    adv = torch.randn((b, t, n) if per_token else (b, n), generator=g).to(dtype)
                    mask = torch.rand((b, t), generator=g) < 0.8
                    with specialise.record_launches(execute=True, gpu_launch=True) as launches:
                        if i % 2:
                            loss = pama_ext.pama_loss(logp, old, adv, mask, granularity=gran, loss_agg=agg, backend="triton")
                        else:
                            loss, _st = pama_ext.pama_loss_and_stats(
                                logp, old, adv, mask, granularity=gran, loss_agg=agg, backend="triton"
                            )
                        loss.backward()
                    assert torch.isfinite(loss).item() and torch.isfinite(logp.grad.float()).all().item()
                    out += [(str(dtype), n, gran, launch) for launch in launches]
    return out


def _sweep(dtype, n, gran, respect_do_not_specialize=True):
    """{kernel: {JIT key: a launch}} over the shape sweep of one (dtype, N, granularity):
    the host code's launches, recorded without running a kernel."""
    from pama_ext.triton_backend import specialise

    out = collections.defaultdict(dict)
    for i, t in enumerate(SWEEP_T):
        b = SWEEP_B[i % len(SWEEP_B)]
        if b * t > 2**18:
            b = 16
        for launch in specialise.host_launches(
            dtype, n, gran, b=b, t=t, loss_agg=LOSS_AGGS[i % 2], per_token_advantages=i % 3 != 0
        ):
            out[launch.name].setdefault(specialise.jit_key(launch, respect_do_not_specialize), launch)
    return dict(out)


def _interpreter_work():
    """(In the TRITON_INTERPRET=1 worker.) The real calls, then the sweep of every
    (dtype, N, granularity), and for two of them the sweep as if without do_not_specialize."""
    import torch

    real = _real_launches()
    configs = [(d, n, g) for d in (torch.float32, torch.bfloat16) for n in NS for g in GRANULARITIES]
    sweep = {(str(d), n, g): _sweep(d, n, g) for d, n, g in configs}
    without = {(str(d), n, g): _sweep(d, n, g, False) for d, n, g in ((torch.float32, 1, "batch"), (torch.bfloat16, 5, "sequence"))}
    return real, sweep, without


@pytest.fixture(scope="module")
def interpreter():
    """One worker with TRITON_INTERPRET=1; the real calls start at once, in the background."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_interpreter_mode) as ex:
        yield ex.submit(_interpreter_work)


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited state
    with ProcessPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), mp_context=ctx, initializer=_compiled_mode
    ) as ex:
        yield ex


@pytest.fixture(scope="module")
def specs(interpreter):
    from pama_ext.triton_backend import specialise

    return specialise.specialisations()


def test_specialisations_cover_every_kernel(specs):
    import torch

    from pama_ext.triton_backend import ops

    assert sorted(specs) == sorted(KERNELS)
    block_ns = {launch.kwargs["BN"] for launch in specs["reduce_tokens_kernel"].values()}
    assert block_ns == {ops.block_n(n) for n in range(1, 65)} == {1, 2, 4, 8, 16, 32, 64}
    dtypes = {launch.args[1].dtype for launch in specs["backward_kernel"].values()}
    assert dtypes == {torch.float32, torch.float64, torch.bfloat16, torch.float16}


def test_emulation_applies_tritons_rules():
    """Triton's rules, through the emulation: without the kernels' lists an int equal to 1
    is a constexpr and a multiple of 16 gets a divisibility attribute; with them the shape
    arguments are plain i32, N = 1 stays a constexpr; the buffers are 16-byte aligned."""
    import torch

    from pama_ext.triton_backend import specialise

    div16 = [["tt.divisibility", 16]]
    for n in (1, 16):
        launch = specialise.host_launches(torch.float32, n, "token", b=1, t=32, backward=False)[0]
        assert launch.name == "reduce_tokens_kernel" and launch.args[6:9] == (32, n, 1)  # T, N, nblk
        raw = specialise.jit_specialisation(launch, respect_do_not_specialize=False)
        spec = specialise.jit_specialisation(launch)
        names = list(spec.signature)
        attr = lambda s, arg: s.attrs.get((names.index(arg),))  # noqa: E731
        assert raw.signature["nblk"] == "constexpr" and raw.signature["T"] == "i32" and attr(raw, "T") == div16
        assert spec.signature["nblk"] == spec.signature["T"] == "i32" and not attr(spec, "T") and not attr(spec, "nblk")
        assert spec.signature["N"] == ("constexpr" if n == 1 else "i32"), spec.signature
        assert raw.signature["N"] == spec.signature["N"] and (attr(raw, "N") == div16) == (n == 16)
        assert not attr(spec, "N")  # do_not_specialize_on_alignment
        assert attr(spec, "logp_ptr") == attr(spec, "part_ptr") == div16
        # token: the [B, T] gradient factor is written (TOKEN_F), to an acc-dtype buffer
        assert spec.signature["fac_ptr"] == "*fp32" and spec.constexprs[(names.index("TOKEN_F"),)] is True
        assert attr(spec, "fac_ptr") == div16


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_for_sm90(name, specs, pool):
    items = list(specs[name].values())
    assert items, name
    futures = [pool.submit(_compile, launch) for launch in items]
    errors = [e for e in (f.result() for f in futures) if e]
    assert not errors, f"{len(errors)} of {len(items)} specialisations of {name} fail to compile:\n" + "\n\n".join(errors[:3])


def test_real_launches_compile_for_sm90(interpreter, specs, pool):
    """The interpreter's real calls: every launch compiles as the JIT specialises it, and
    specialises like one of the enumerated launches (the enumeration is what the API launches)."""
    from pama_ext.triton_backend import specialise

    real, _sweep_keys, _without = interpreter.result()
    assert {launch.name for *_, launch in real} == set(KERNELS)
    distinct = {}
    for _dtype, _n, _gran, launch in real:
        distinct.setdefault(specialise.jit_key(launch), launch)
    n_one = {launch.name for launch in distinct.values() if specialise.jit_specialisation(launch).signature.get("N") == "constexpr"}
    assert n_one >= {"reduce_tokens_kernel", "reduce_rows_kernel", "finalize_kernel", "backward_kernel"}, n_one
    futures = [pool.submit(_compile, launch) for launch in distinct.values()]
    errors = [e for e in (f.result() for f in futures) if e]
    assert not errors, f"{len(errors)} of {len(distinct)} real launches fail to compile:\n" + "\n\n".join(errors[:3])
    missing = [launch for key, launch in distinct.items() if key not in specs[launch.name]]
    assert not missing, f"{len(missing)} real launches that the enumeration does not produce, e.g. {missing[:2]}"


def test_shape_sweep_is_one_variant_per_config(interpreter, specs):
    """Over T = 100..4096 (and B, advantage layouts, aggregations) each kernel compiles once
    per (dtype, N, granularity), a specialisation the compile test covers; without the
    do_not_specialize lists the same sweep would compile several."""
    from pama_ext.triton_backend import specialise

    _real, sweep, without = interpreter.result()
    bad = {(c, name): len(keys) for c, kernels in sweep.items() for name, keys in kernels.items() if len(keys) != 1}
    per_kernel = collections.Counter()
    for (_c, name), count in bad.items():
        per_kernel[name] = max(per_kernel[name], count)
    assert not bad, (
        f"{len({c for c, _ in bad})} of {len(sweep)} (dtype, N, granularity) compile more than one kernel over "
        f"the shape sweep (most variants per kernel: {dict(per_kernel)}), e.g. {dict(list(bad.items())[:5])}"
    )
    for kernels in sweep.values():
        for name, keys in kernels.items():
            (key, launch), = keys.items()
            assert specialise.jit_key(launch) == key and key in specs[name], (name, launch.kwargs)
    assert all(len(w["reduce_tokens_kernel"]) > 1 for w in without.values()), "the sweep no longer varies the shapes"


def _token_pass_ptx(dtype, n, gran):
    """(In a compiled-mode worker.) PTX of the token pass for sm_90 as the JIT compiles it,
    its launch, and ptxas' registers and spill bytes."""
    import triton

    from pama_ext.triton_backend import specialise

    (launch,) = [x for x in specialise.host_launches(dtype, n, gran, b=64, t=4096, backward=False) if x.name == "reduce_tokens_kernel"]
    ptx = _triton_compile(launch, specialise.jit_specialisation(launch, arch=ARCH)).asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", f"-arch=sm_{ARCH}a", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stderr[-1000:]
    regs = int(re.search(r"Used (\d+) registers", out.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out.stderr).group(1))
    return ptx, launch, regs, spills


def _loop_bodies(ptx):
    """The PTX of each loop: from a label to the last branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"\s*(\$L__\w+):", ln))}
    bodies = []
    for i, ln in enumerate(lines):
        if "bra" in ln:
            target = ln.split()[-1].rstrip(";")
            if target in labels and labels[target] < i:
                bodies.append("\n".join(lines[labels[target]:i + 1]))
    return bodies


@pytest.mark.parametrize("n,gran", [(4, "batch"), (4, "token"), (8, "batch"), (2, "sequence")])
def test_token_pass_loop_keeps_loads_in_flight(n, gran, pool):
    """The performance shape of the token pass for sm_90 (benchmarks/GPU.md, "The token pass"):
    the loop over tokens moves no data through shared memory (a lane's objectives and Gram
    pairs stay in its thread), loads each token's N advantages as one vector, and issues the
    loads of UNROLL steps in one iteration; ptxas spills nothing."""
    import torch

    from pama_ext.triton_backend import ops

    ptx, launch, regs, spills = pool.submit(_token_pass_ptx, torch.bfloat16, n, gran).result()
    unroll = launch.kwargs["UNROLL"]
    assert launch.kwargs["ADV_VEC"] == n and unroll == ops.token_unroll(ops.block_n(n), True) > 1
    loops = [b for b in _loop_bodies(ptx) if "ld.global" in b]
    assert loops, "no loop with global loads"
    body = max(loops, key=lambda b: b.count("ld.global"))  # the unrolled main loop
    assert "bar.sync" not in body and "st.shared" not in body and "ld.shared" not in body
    assert body.count("ld.global") >= 4 * unroll  # mask, logp, old_logp, advantages per step
    vec = {2: "b32", 4: "v2.b32", 8: "v4.b32"}[n]  # N bf16 advantages: 2N bytes in one load
    assert f"ld.global.{vec}" in body, sorted(set(re.findall(r"ld\.global[.\w]*", body)))
    assert spills == 0 and regs <= 255
