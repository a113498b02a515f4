"""Triton kernels of the fused PAMA op (the contract is ``csrc/README.md``).

Imported lazily by ``ops.py`` at the first call (importing this module imports Triton).
Set ``TRITON_INTERPRET=1`` before the first import to run the kernels on CPU tensors
through Triton's interpreter (the CPU CI does that).

The forward is one pass over the tokens, then a few tiny kernels on O(B + N^2) numbers;
nothing reads the tokens twice and nothing synchronises with the host:

1. ``reduce_tokens_kernel`` (grid: B x blocks-per-row, blocks never cross a sequence)
   reads logp, old_logp, advantages and mask once and writes, per block, the sufficient
   statistics of every granularity in float64 (the layout is the ``SLOT_*`` constants
   below): valid tokens M, clipped tokens, non-finite counts, ``Smin = sum s_t m`` (s_t the
   zero-abstaining token min, ``_token_min``),
   ``S_i = sum A_i m``, ``Q_i = sum I_i`` and, for ``batch``, the N x N Gram of I.
   For ``token`` it also writes the [B, T] per-token gradient factor
   ``f = s_t u_t 1[u_t <= 1 + eps]`` (0 at invalid tokens), which the forward returns as
   ``weights`` and the autograd backward multiplies by (``reference.token_factor_backward``).
   Per-token maths runs in float32 (float64 for float64 inputs); every product that is
   summed is formed and accumulated in float64 (each lane accumulates its own tokens,
   one tree reduction at the end), so a sum never depends on the launch.
2. ``reduce_rows_kernel`` (grid: groups of rows) sums the blocks of each row in a fixed
   order, derives the per-row quantities (M_b; for ``sequence`` Theorem 1 on the row's
   scalars, written to ``weights``; for ``sequence_gram`` the outer product v_b v_b^T of
   the row's mean v_b = Q_b / M_b, written to the Gram slots, so that each response counts
   once; the per-row sums ``seq_mean_token_mean`` needs, such as sum_b S_b / M_b) and sums
   its rows, in a fixed order, into one partial vector.
3. ``reduce_total_kernel`` (one program) sums those partial vectors in a fixed order.
4. ``support_candidates_kernel`` (``batch`` / ``sequence_gram`` with 3 <= N <= ENUM_MAX_N
   only; each program
   takes SB of the 2^N - 1 non-empty supports S side by side): solves the bordered KKT
   system of the affine minimiser on S (Gaussian elimination with partial pivoting, on
   G / max_j G_jj; a pivot below 1e-15 rejects the support) and writes the candidate
   weights (clamped at 0, normalised) and their objective c^T H c.
5. ``finalize_kernel`` (one program): the weights (Theorem 1, the N = 2 closed form, or
   the best candidate followed by duplicate splitting), the objective and KKT residual,
   the loss, ``row_scale`` and the statistics.

The backward is ``backward_kernel``: one elementwise pass writing dL/dlogp in logp's dtype.

Every sum is taken in a fixed order over fixed blocks that depend on the shapes only, so
the results are bitwise reproducible run to run.

Why enumerating supports is exact: the minimum of c^T G c over the simplex is attained
at the affine minimiser of some affinely independent support S (Caratheodory), whose
bordered system [G_S 1; 1^T 0] is then non-singular, and a candidate from any other
support, once clamped onto the simplex, is a feasible point, so its objective (evaluated
directly, not trusted from the solve) can only be larger. The minimum over the
2^N - 1 candidates is therefore the exact minimum up to rounding.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Reductions are written as tl.reduce with the standard combine functions (what tl.sum,
# tl.max, tl.argmax expand to): the same code on the GPU, and in the interpreter a direct
# numpy reduction instead of a nested device-function call (which re-patches the language
# modules on every call, ~10 ms each).
from triton.language.standard import (
    _argmax_combine_tie_break_left,
    _argmin_combine_tie_break_left,
    _elementwise_max,
    _elementwise_min,
    _sum_combine,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Layout of a statistics vector (float64), shared by the three reduction levels.
SLOT_M = tl.constexpr(0)  # valid tokens
SLOT_CLIP = tl.constexpr(1)  # valid tokens with u > 1 + eps
SLOT_NF_LOGP = tl.constexpr(2)  # masked tokens with non-finite logp
SLOT_NF_OLD = tl.constexpr(3)  # ... old_logp
SLOT_NF_ADV = tl.constexpr(4)  # ... advantages
SLOT_SMIN = tl.constexpr(5)  # sum s_t * min(u, 1+eps), s_t = _token_min  (token)
SLOT_SMIN_M = tl.constexpr(6)  # sum_b Smin_b / M_b                    (derived per row)
SLOT_NONEMPTY = tl.constexpr(7)  # rows with M_b > 0                      (derived)
SLOT_SEQ_L = tl.constexpr(8)  # sum_b c_b . S_b                         (sequence, derived)
SLOT_SEQ_LM = tl.constexpr(9)  # sum_b c_b . S_b / M_b                  (sequence, derived)
SLOT_SEQ_OBJ = tl.constexpr(10)  # sum over non-empty rows of (c_b . a_b)^2 (sequence, derived)
OFF_S = tl.constexpr(11)  # then S (N), S_over_M (N, derived), Q (N), Gram (N*N, batch and sequence_gram)
N_FIXED_SLOTS = 11

ENUM_MAX_N = 10  # Gram solves with 3 <= N <= ENUM_MAX_N: exact support enumeration on the device

# finalize_kernel's GRAN: 0 batch, 1 token, 2 sequence, 3 batch_mean, 4 sequence_gram (ops._GRAN).
# The Gram solves (batch: the token Gram of pass 1; sequence_gram: the Gram of the per-row
# means from pass 2a) share the Gram slots and the weight modes:
WMODE_CLOSED = 0  # Gram solve, N <= 2: the closed form
WMODE_CANDIDATES = 1  # Gram solve, 3 <= N <= ENUM_MAX_N: best of the support candidates
WMODE_GIVEN = 2  # Gram solve, N > ENUM_MAX_N: weights solved on the host (documented sync)

# tolerances (written as literals in the kernels): duplicates and the N = 2 denominator
# 1e-12 relative (as csrc/pama_math.h), pivots of the scale-free bordered system 1e-15


# Launch-time specialisation. Triton's JIT turns an int argument equal to 1 into a
# compile-time constant (a plain Python int, with no .to) and compiles a separate variant
# for ints divisible by 16. So (a) N, which stays specialised (one kernel per N anyway),
# is only ever used through operators and tl.cast, never N.to(...); (b) every shape
# argument (T, B, strides, block counts) is listed in do_not_specialize, so one compiled
# kernel serves every padded length of a dtype / N / granularity instead of recompiling
# whenever T changes; (c) the sizes derived from N (KS, NS, off_g) are not specialised
# either, nor is N on divisibility (do_not_specialize_on_alignment): a multiple of 16
# there changes nothing that matters in these O(B + N^2) kernels, and without it the N of
# one block width BN share a kernel, which keeps the set the AOT test compiles small.
# Pointers keep their 16-byte alignment attribute (vector loads in backward_kernel).
# python_tests/test_triton_aot.py compiles the launches exactly as the JIT specialises
# them (benchmarks/triton_variants.py counts the variants of a shape sweep).

# exp: libdevice's accurate expf/exp on the GPU (tl.exp lowers to the approximate ex2 for
# float32, which would move tokens across the clip boundary u = 1 + eps); the interpreter
# has no libdevice and uses numpy's exp.
USE_LIBDEVICE = tl.constexpr(not INTERPRET)


# --------------------------------------------------------------------------- pass 1
@triton.jit(do_not_specialize=["T", "nblk", "nch", "stride_ab", "stride_at", "KS"], do_not_specialize_on_alignment=["N"])
def reduce_tokens_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,  # uint8 view of the bool mask
    part_ptr,  # [B * nblk, KS] float64
    fac_ptr,  # [B, T] acc dtype: the token gradient factor (TOKEN_F); unused otherwise
    T,
    N,
    nblk,  # blocks per row
    nch,  # chunks of CHUNK tokens per block
    stride_ab,  # advantages: elements between rows
    stride_at,  # advantages: elements between tokens (0 for [B, N])
    KS,
    thr_hi,  # 1 + clip_eps = thr_hi + thr_mid + thr_lo exactly (three float32, see ops.py)
    thr_mid,
    thr_lo,
    CD: tl.constexpr,  # compute dtype of the per-token maths (fp32, or fp64 for fp64 inputs)
    BN: tl.constexpr,  # next power of two >= N
    CHUNK: tl.constexpr,  # tokens per step, one lane each: a lane accumulates its own tokens
    UNROLL: tl.constexpr,  # steps unrolled, so that their loads are in flight together (see below)
    ADV_VEC: tl.constexpr,  # BN when the advantage rows are packed (N == BN), else 1 (see below)
    DO_GRAM: tl.constexpr,
    TOKEN_F: tl.constexpr,  # granularity "token": write f = s_t u_t 1[u_t <= 1+eps] to fac_ptr
):
    # Layout. The token axis is the last axis of every tile ([BN, CHUNK] advantages,
    # [BN, BN, CHUNK] Gram lanes). For small N this puts the CHUNK lanes on threads and a
    # lane's N objectives and N x N pairs in that thread's registers, so the per-token sums
    # over objectives and the Gram products move no data; the Gram keeps its upper triangle
    # only (the pairs below the diagonal are a constant 0 per register and take none). With
    # the token axis first, Triton spread the N x N pairs over 16 threads and converted
    # layouts through shared memory on every step.
    # UNROLL: the token pass is bound by memory latency (one token a thread in flight, the
    # first H200 run measured 0.08 of the copy bandwidth). Unrolled steps let ptxas issue
    # the loads of UNROLL steps before the first sum, so each thread has UNROLL tokens in
    # flight; the sums still run step by step, in token order.
    # ADV_VEC: with the strides passed divided by it, the advantage offsets are multiples of
    # BN that Triton can prove, and the BN advantages of a token load as one vector (the
    # strides are runtime ints, so without it every advantage is its own 2- or 4-byte load).
    pid = tl.program_id(0)
    b = pid // nblk
    j = pid - b * nblk
    b64 = b.to(tl.int64)
    row = b64 * T
    t0 = j * nch * CHUNK
    lt = tl.arange(0, CHUNK)
    ln = tl.arange(0, BN)
    in_n = ln < N
    nmask = in_n[:, None]  # [BN, 1]
    if ADV_VEC > 1:
        amask = tl.full((BN, 1), True, tl.int1)  # N == BN: no column to mask, the vector stays whole
    else:
        amask = nmask
    thr_c = tl.cast(tl.cast(thr_hi, tl.float64) + tl.cast(thr_mid, tl.float64) + tl.cast(thr_lo, tl.float64), CD)

    acc_s = tl.zeros((BN, CHUNK), dtype=tl.float64)
    acc_q = tl.zeros((BN, CHUNK), dtype=tl.float64)
    acc_smin = tl.zeros((CHUNK,), dtype=tl.float64)
    cnt_m = tl.zeros((CHUNK,), dtype=tl.int32)
    cnt_clip = tl.zeros((CHUNK,), dtype=tl.int32)
    cnt_nfl = tl.zeros((CHUNK,), dtype=tl.int32)
    cnt_nfo = tl.zeros((CHUNK,), dtype=tl.int32)
    cnt_nfa = tl.zeros((CHUNK,), dtype=tl.int32)
    if DO_GRAM:
        acc_g = tl.zeros((BN, BN, CHUNK), dtype=tl.float64)
        upper = ln[:, None] <= ln[None, :]  # [BN, BN]
    for c in tl.range(0, nch, loop_unroll_factor=UNROLL):
        t = t0 + c * CHUNK + lt
        inrow = t < T
        mk = tl.load(mask_ptr + row + t, mask=inrow, other=0) != 0
        lp = tl.load(logp_ptr + row + t, mask=inrow, other=0.0).to(CD)
        old = tl.load(old_ptr + row + t, mask=inrow, other=0.0).to(CD)
        aoff = (b64 * stride_ab + t.to(tl.int64) * stride_at)[None, :] * ADV_VEC + ln[:, None]
        a = tl.load(adv_ptr + aoff, mask=inrow[None, :] & amask, other=0.0).to(CD)  # [BN, CHUNK]
        fin_lp = (tl.abs(lp) < float("inf"))
        fin_old = (tl.abs(old) < float("inf"))
        fin_adv = tl.reduce((~(tl.abs(a) < float("inf"))).to(tl.int32), 0, _sum_combine) == 0
        valid = mk & fin_lp & fin_old & fin_adv
        cnt_nfl += (mk & ~fin_lp).to(tl.int32)
        cnt_nfo += (mk & ~fin_old).to(tl.int32)
        cnt_nfa += (mk & ~fin_adv).to(tl.int32)
        d = tl.where(valid, lp - old, 0.0)
        if USE_LIBDEVICE:
            u = libdevice.exp(d)
        else:
            u = tl.exp(d)
        ind = u <= thr_c
        m = tl.where(valid, tl.where(ind, u, thr_c), 0.0)  # min(u, 1+eps), a select (u = inf)
        cnt_m += valid.to(tl.int32)
        cnt_clip += (valid & ~ind).to(tl.int32)
        an = tl.where(valid[None, :], tl.maximum(a, 0.0), 0.0)  # Noon clamp, 0 off the valid tokens
        ad = an.to(tl.float64)
        md = m.to(tl.float64)
        acc_s += ad * md[None, :]
        ia = tl.where(ind[None, :], ad, 0.0)  # I(A)
        acc_q += ia
        amin = _token_min(a, valid, nmask, 0)  # exactly-zero advantages abstain
        acc_smin += amin.to(tl.float64) * md
        if TOKEN_F:  # every token of the block written: 0 off the valid, unclipped tokens
            f = tl.where(valid & ind, amin * u, 0.0)  # in CD; a select, so u = inf gives 0
            tl.store(fac_ptr + row + t, f.to(fac_ptr.dtype.element_ty), mask=inrow)
        if DO_GRAM:
            acc_g += tl.where(upper[:, :, None], ia[:, None, :] * ia[None, :, :], 0.0)

    base = part_ptr + pid.to(tl.int64) * KS
    tl.store(base + SLOT_M, tl.reduce(cnt_m, 0, _sum_combine).to(tl.float64))
    tl.store(base + SLOT_CLIP, tl.reduce(cnt_clip, 0, _sum_combine).to(tl.float64))
    tl.store(base + SLOT_NF_LOGP, tl.reduce(cnt_nfl, 0, _sum_combine).to(tl.float64))
    tl.store(base + SLOT_NF_OLD, tl.reduce(cnt_nfo, 0, _sum_combine).to(tl.float64))
    tl.store(base + SLOT_NF_ADV, tl.reduce(cnt_nfa, 0, _sum_combine).to(tl.float64))
    tl.store(base + SLOT_SMIN, tl.reduce(acc_smin, 0, _sum_combine))
    tl.store(base + OFF_S + ln, tl.reduce(acc_s, 1, _sum_combine), mask=in_n)
    tl.store(base + OFF_S + 2 * N + ln, tl.reduce(acc_q, 1, _sum_combine), mask=in_n)
    if DO_GRAM:
        g = tl.reduce(acc_g, 2, _sum_combine)
        g = tl.where(upper, g, tl.trans(g))  # the lower triangle mirrored
        tl.store(
            base + OFF_S + 3 * N + ln[:, None] * N + ln[None, :],
            g,
            mask=in_n[:, None] & in_n[None, :],
        )


# --------------------------------------------------------------------------- token min
@triton.jit
def _token_min(a, valid, nmask, AXIS: tl.constexpr):
    """s_t of granularity "token" from the raw advantages a, objectives along AXIS
    (pama_math.h's token_min): key = a (a > 0), 0 (a < 0), +inf (a == 0, -0.0 included: the
    objective abstains; also the padding objectives, where nmask, broadcast like a, is
    false); s = min key, 0 when that is +inf or the token is not valid."""
    key = tl.where(a > 0.0, a, tl.where(a < 0.0, 0.0, float("inf")))
    key = tl.where(nmask, key, float("inf"))
    kmin = tl.reduce(key, AXIS, _elementwise_min)
    return tl.where(valid & (kmin < float("inf")), kmin, 0.0)


# --------------------------------------------------------------------------- Theorem 1
@triton.jit
def _theorem1(a, valid, N):
    """Weights on the lanes ``valid`` minimising (sum_i c_i a_i)^2 (csrc/README.md rules)."""
    lo = tl.reduce(tl.where(valid, a, float("inf")), 0, _elementwise_min)
    hi = tl.reduce(tl.where(valid, a, float("-inf")), 0, _elementwise_max)
    at_lo = valid & (a == lo)
    at_hi = valid & (a == hi)
    at_zero = valid & (a == 0.0)
    k_lo = tl.reduce(at_lo.to(tl.float64), 0, _sum_combine)
    k_hi = tl.reduce(at_hi.to(tl.float64), 0, _sum_combine)
    k_zero = tl.reduce(at_zero.to(tl.float64), 0, _sum_combine)
    pos = tl.where(at_lo, 1.0 / tl.maximum(k_lo, 1.0), 0.0)
    neg = tl.where(at_hi, 1.0 / tl.maximum(k_hi, 1.0), 0.0)
    zero = tl.where(at_zero, 1.0 / tl.maximum(k_zero, 1.0), 0.0)
    span = hi - lo
    span = tl.where(span > 0.0, span, 1.0)
    two = pos * (hi / span) + neg * (-lo / span)
    mixed = tl.where(k_zero > 0.0, zero, two)
    c = tl.where(lo > 0.0, pos, tl.where(hi < 0.0, neg, mixed))
    finite = (tl.abs(lo) < float("inf")) & (tl.abs(hi) < float("inf"))
    uniform = tl.where(valid, 1.0 / tl.cast(N, tl.float64), 0.0)  # N may be a constexpr (see the note above)
    return tl.where(finite, c, uniform)


@triton.jit
def _row_sum_scalar(pbase, nblk, KS, slot, BLOCK_J: tl.constexpr):
    lj = tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_J,), dtype=tl.float64)
    for j0 in range(0, nblk, BLOCK_J):
        jj = j0 + lj
        acc += tl.load(pbase + jj.to(tl.int64) * KS + slot, mask=jj < nblk, other=0.0)
    return tl.reduce(acc, 0, _sum_combine)


@triton.jit
def _row_sum_vector(pbase, nblk, KS, off, N, BLOCK_J: tl.constexpr, BN: tl.constexpr):
    lj = tl.arange(0, BLOCK_J)
    ln = tl.arange(0, BN)
    acc = tl.zeros((BLOCK_J, BN), dtype=tl.float64)
    for j0 in range(0, nblk, BLOCK_J):
        jj = j0 + lj
        ptrs = pbase + jj.to(tl.int64)[:, None] * KS + off + ln[None, :]
        acc += tl.load(ptrs, mask=(jj < nblk)[:, None] & (ln < N)[None, :], other=0.0)
    return tl.reduce(acc, 0, _sum_combine)


# --------------------------------------------------------------------------- pass 2a: rows
@triton.jit(do_not_specialize=["B", "nblk", "KS", "rows_per_prog"], do_not_specialize_on_alignment=["N"])
def reduce_rows_kernel(
    part_ptr,  # [B * nblk, KS]
    part2_ptr,  # [cdiv(B, rows_per_prog), KS]
    row_m_ptr,  # [B] float64: M_b
    weights_ptr,  # [B, N] acc dtype (sequence only)
    B,
    N,
    nblk,
    KS,
    rows_per_prog,
    SEQ: tl.constexpr,
    SGRAM: tl.constexpr,  # sequence_gram: the Gram slots get sum over rows of v_b v_b^T
    BN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    r0 = pid * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, B)
    ln = tl.arange(0, BN)
    nmask = ln < N
    # additive slots: summed flat over this group's blocks, in order (for sequence_gram the
    # Gram slots of pass 1 are not written: the Gram is formed below, per row)
    k = tl.arange(0, BLOCK_K)
    if SGRAM:
        add_end = OFF_S + 3 * N
    else:
        add_end = KS
    additive = (k < SLOT_SMIN_M) | ((k >= OFF_S) & (k < OFF_S + N)) | ((k >= OFF_S + 2 * N) & (k < add_end))
    lp = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float64)
    p_hi = r1 * nblk
    for p0 in range(r0 * nblk, p_hi, BLOCK_P):
        pp = p0 + lp
        ptrs = part_ptr + pp.to(tl.int64)[:, None] * KS + k[None, :]
        acc += tl.load(ptrs, mask=(pp < p_hi)[:, None] & additive[None, :], other=0.0)
    out = part2_ptr + pid.to(tl.int64) * KS
    tl.store(out + k, tl.reduce(acc, 0, _sum_combine), mask=additive)

    # per-row derived quantities
    smin_m = tl.zeros((), dtype=tl.float64)
    nonempty = tl.zeros((), dtype=tl.float64)
    seq_l = tl.zeros((), dtype=tl.float64)
    seq_lm = tl.zeros((), dtype=tl.float64)
    seq_obj = tl.zeros((), dtype=tl.float64)
    s_over_m = tl.zeros((BN,), dtype=tl.float64)
    if SGRAM:
        acc_g = tl.zeros((BN, BN), dtype=tl.float64)
    for r in range(r0, r1):
        pbase = part_ptr + tl.cast(r, tl.int64) * nblk * KS
        m_b = _row_sum_scalar(pbase, nblk, KS, SLOT_M, BLOCK_J)
        smin_b = _row_sum_scalar(pbase, nblk, KS, SLOT_SMIN, BLOCK_J)
        s_b = _row_sum_vector(pbase, nblk, KS, OFF_S, N, BLOCK_J, BN)
        ne = m_b > 0.0
        inv = tl.where(ne, 1.0 / tl.maximum(m_b, 1.0), 0.0)
        smin_m += smin_b * inv
        nonempty += ne.to(tl.float64)
        s_over_m += s_b * inv
        tl.store(row_m_ptr + r, m_b)
        if SEQ:
            q_b = _row_sum_vector(pbase, nblk, KS, OFF_S + 2 * N, N, BLOCK_J, BN)
            a = q_b / tl.maximum(m_b, 1.0)
            c = _theorem1(a, nmask, N)
            tl.store(weights_ptr + tl.cast(r, tl.int64) * N + ln, c.to(weights_ptr.dtype.element_ty), mask=nmask)
            pl = tl.reduce(c * s_b, 0, _sum_combine)
            seq_l += pl
            seq_lm += pl * inv
            ca = tl.reduce(c * a, 0, _sum_combine)
            seq_obj += tl.where(ne, ca * ca, 0.0)
        if SGRAM:  # each response once: v_b = Q_b / M_b (0 for an empty row), rows in order
            q_b = _row_sum_vector(pbase, nblk, KS, OFF_S + 2 * N, N, BLOCK_J, BN)
            v = q_b / tl.maximum(m_b, 1.0)
            acc_g += v[:, None] * v[None, :]
    tl.store(out + SLOT_SMIN_M, smin_m)
    tl.store(out + SLOT_NONEMPTY, nonempty)
    tl.store(out + SLOT_SEQ_L, seq_l)
    tl.store(out + SLOT_SEQ_LM, seq_lm)
    tl.store(out + SLOT_SEQ_OBJ, seq_obj)
    tl.store(out + OFF_S + N + ln, s_over_m, mask=nmask)
    if SGRAM:
        tl.store(out + OFF_S + 3 * N + ln[:, None] * N + ln[None, :], acc_g, mask=nmask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------- pass 2b: total
@triton.jit(do_not_specialize=["n_rows", "KS"])
def reduce_total_kernel(part2_ptr, tot_ptr, n_rows, KS, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    k = tl.arange(0, BLOCK_K)
    lr = tl.arange(0, BLOCK_R)
    for k0 in range(0, KS, BLOCK_K):
        kk = k0 + k
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float64)
        for r0 in range(0, n_rows, BLOCK_R):
            rr = r0 + lr
            ptrs = part2_ptr + rr.to(tl.int64)[:, None] * KS + kk[None, :]
            acc += tl.load(ptrs, mask=(rr < n_rows)[:, None] & (kk < KS)[None, :], other=0.0)
        tl.store(tot_ptr + kk, tl.reduce(acc, 0, _sum_combine), mask=kk < KS)


# --------------------------------------------------------------------------- min-norm: candidates
@triton.jit(do_not_specialize=["NS", "off_g"], do_not_specialize_on_alignment=["N"])
def support_candidates_kernel(tot_ptr, cand_ptr, obj_ptr, N, NS, off_g, BN1: tl.constexpr, SB: tl.constexpr):
    """Candidate weights of the supports pid*SB + 1 .. pid*SB + SB (bit i of the support id:
    objective i is in S), one support per slice of a [SB, BN1, BN1] tile."""
    pid = tl.program_id(0)
    sid = pid * SB + tl.arange(0, SB) + 1  # [SB]
    live = sid <= NS
    r = tl.arange(0, BN1)
    r2 = r[None, :]  # [1, BN1]
    rr = r[:, None]
    cc = r[None, :]
    g = tl.load(tot_ptr + off_g + rr * N + cc, mask=(rr < N) & (cc < N), other=0.0)
    diag = tl.reduce(tl.where(rr == cc, g, 0.0), 1, _sum_combine)
    dmax = tl.reduce(diag, 0, _elementwise_max)
    h = g / tl.where(dmax > 0.0, dmax, 1.0)  # scale-free: |H_ij| <= 1
    in_s = (((sid[:, None] >> r2) & 1) == 1) & (r2 < N)  # [SB, BN1]
    R = r[None, :, None]  # row index, [1, BN1, 1]
    C = r[None, None, :]  # column index, [1, 1, BN1]
    in_r = in_s[:, :, None]
    in_c = in_s[:, None, :]
    # bordered system [H_S 1; 1^T 0] [mu; nu] = [0; 1], identity rows for i outside S
    kk = tl.where(in_r & in_c, h[None, :, :], 0.0)
    kk = tl.where(in_r & (C == N), 1.0, kk)
    kk = tl.where((R == N) & in_c, 1.0, kk)
    kk = tl.where((R == C) & (~in_r) & (R != N), 1.0, kk)
    rhs = tl.where((r2 == N) & live[:, None], 1.0, 0.0).to(tl.float64)  # [SB, BN1]
    idx = tl.zeros((SB, BN1), dtype=tl.int32) + r2
    ok = live
    for p in range(0, N + 1):
        colp = tl.reduce(tl.where(C == p, kk, 0.0), 2, _sum_combine)  # column p, [SB, BN1]
        cand = tl.where(r2 >= p, tl.abs(colp), -1.0)
        best, piv = tl.reduce((cand, idx), 1, _argmax_combine_tie_break_left)  # [SB]
        good = best > 1e-15
        ok = ok & good
        pv = piv[:, None]
        row_p = tl.reduce(tl.where(R == p, kk, 0.0), 1, _sum_combine)  # [SB, BN1]
        row_v = tl.reduce(tl.where(R == pv[:, :, None], kk, 0.0), 1, _sum_combine)
        rhs_p = tl.reduce(tl.where(r2 == p, rhs, 0.0), 1, _sum_combine)  # [SB]
        rhs_v = tl.reduce(tl.where(r2 == pv, rhs, 0.0), 1, _sum_combine)
        col_v = tl.reduce(tl.where(r2 == pv, colp, 0.0), 1, _sum_combine)  # signed pivot
        col_p = tl.reduce(tl.where(r2 == p, colp, 0.0), 1, _sum_combine)
        kk = tl.where(R == p, row_v[:, None, :], tl.where(R == pv[:, :, None], row_p[:, None, :], kk))
        rhs = tl.where(r2 == p, rhs_v[:, None], tl.where(r2 == pv, rhs_p[:, None], rhs))
        colp = tl.where(r2 == p, col_v[:, None], tl.where(r2 == pv, col_p[:, None], colp))
        f = tl.where(r2 > p, colp / tl.where(good, col_v, 1.0)[:, None], 0.0)
        kk = kk - f[:, :, None] * row_v[:, None, :]
        rhs = rhs - f * rhs_v[:, None]
    mu = tl.zeros((SB, BN1), dtype=tl.float64)
    for q in range(0, N + 1):
        p = N - q
        row_p = tl.reduce(tl.where(R == p, kk, 0.0), 1, _sum_combine)  # [SB, BN1]
        d = tl.reduce(tl.where(r2 == p, row_p, 0.0), 1, _sum_combine)
        s = tl.reduce(tl.where(r2 > p, row_p * mu, 0.0), 1, _sum_combine)
        rhs_p = tl.reduce(tl.where(r2 == p, rhs, 0.0), 1, _sum_combine)
        mu = tl.where(r2 == p, ((rhs_p - s) / tl.where(ok, d, 1.0))[:, None], mu)
    c = tl.where(in_s, mu, 0.0)
    fin = tl.abs(c) < float("inf")
    ok = ok & (tl.reduce((~fin).to(tl.int32), 1, _sum_combine) == 0)
    c = tl.where(fin, tl.maximum(c, 0.0), 0.0)
    tot = tl.reduce(c, 1, _sum_combine)
    ok = ok & (tot > 0.0)
    c = c / tl.where(tot > 0.0, tot, 1.0)[:, None]
    hc = tl.reduce(h[None, :, :] * c[:, None, :], 2, _sum_combine)  # (H c) per support
    f_val = tl.reduce(c * hc, 1, _sum_combine)
    out = (sid - 1).to(tl.int64)
    tl.store(cand_ptr + out[:, None] * BN1 + r2, c, mask=live[:, None])
    tl.store(obj_ptr + out, tl.where(ok, f_val, float("inf")), mask=live)


@triton.jit
def _split_duplicates(g, c, N, BN: tl.constexpr):
    """Objectives with the same advantage vector (G_ii + G_jj - 2 G_ij <= 1e-12 max) share
    their group's total weight; groups formed greedily in index order (csrc/pama_math.h)."""
    ln = tl.arange(0, BN)
    nmask = ln < N
    rr = ln[:, None]
    cc = ln[None, :]
    diag = tl.reduce(tl.where(rr == cc, g, 0.0), 1, _sum_combine)
    group = tl.full((BN,), -1, tl.int32)
    for i in range(0, N):
        gi = tl.reduce(tl.where(ln == i, group, 0), 0, _sum_combine)
        row_i = tl.reduce(tl.where(rr == i, g, 0.0), 0, _sum_combine)
        gii = tl.reduce(tl.where(ln == i, diag, 0.0), 0, _sum_combine)
        dist = gii + diag - 2.0 * row_i
        join = nmask & (ln >= i) & (group < 0) & (gi < 0) & (dist <= 1e-12 * tl.maximum(gii, diag))
        group = tl.where(join, i, group)
        cnt = tl.reduce(join.to(tl.float64), 0, _sum_combine)
        tot = tl.reduce(tl.where(join, c, 0.0), 0, _sum_combine)
        # (a select on the scalar condition: `vector & (scalar > 1.0)` trips the interpreter)
        c = tl.where(join, tl.where(cnt > 1.0, tot / tl.maximum(cnt, 1.0), c), c)
    return c


# --------------------------------------------------------------------------- finalize
@triton.jit(do_not_specialize=["B", "NS", "seq_agg"], do_not_specialize_on_alignment=["N"])
def finalize_kernel(
    tot_ptr,  # [KS] float64 totals
    row_m_ptr,  # [B] float64
    cand_ptr,  # [NS, BN1] candidates (WMODE_CANDIDATES)
    cobj_ptr,  # [NS] candidate objectives
    wgiven_ptr,  # [N] float64 (WMODE_GIVEN)
    weights_ptr,  # [N] acc dtype (batch, batch_mean, sequence_gram); unused otherwise
    row_scale_ptr,  # [B] acc dtype
    loss_ptr,  # [] acc dtype
    stats_ptr,  # [8] float64
    B,
    N,
    NS,
    seq_agg,  # 0: token_mean, 1: seq_mean_token_mean
    GRAN: tl.constexpr,
    WMODE: tl.constexpr,
    BN: tl.constexpr,
    BN1: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    ln = tl.arange(0, BN)
    nmask = ln < N
    nf = tl.cast(N, tl.float64)  # not N.to: N == 1 arrives as a constexpr int
    big_m = tl.load(tot_ptr + SLOT_M)
    nonempty = tl.load(tot_ptr + SLOT_NONEMPTY)
    inv_m = tl.where(big_m > 0.0, 1.0 / tl.maximum(big_m, 1.0), 0.0)
    inv_ne = tl.where(nonempty > 0.0, 1.0 / tl.maximum(nonempty, 1.0), 0.0)
    is_seq = seq_agg != 0
    objective = tl.zeros((), dtype=tl.float64)
    kkt = tl.zeros((), dtype=tl.float64)
    if GRAN == 0 or GRAN == 3 or GRAN == 4:  # batch, batch_mean, sequence_gram: one weight vector
        if GRAN == 0 or GRAN == 4:  # the min-norm point of the Gram in the Gram slots
            rr = ln[:, None]
            cc = ln[None, :]
            off_g = OFF_S + 3 * N
            g = tl.load(tot_ptr + off_g + rr * N + cc, mask=nmask[:, None] & nmask[None, :], other=0.0)
            diag = tl.reduce(tl.where(rr == cc, g, 0.0), 1, _sum_combine)
            dmax = tl.reduce(tl.where(nmask, diag, float("-inf")), 0, _elementwise_max)
            g_ok = (tl.reduce((~(tl.abs(g) < float("inf"))).to(tl.int32), None, _sum_combine) == 0) & (dmax > 0.0)
            uniform = tl.where(nmask, 1.0 / nf, 0.0)
            if WMODE == 0:
                g11 = tl.reduce(tl.where((rr == 0) & (cc == 0), g, 0.0), None, _sum_combine)
                g22 = tl.reduce(tl.where((rr == 1) & (cc == 1), g, 0.0), None, _sum_combine)
                g12 = 0.5 * tl.reduce(tl.where(((rr == 0) & (cc == 1)) | ((rr == 1) & (cc == 0)), g, 0.0), None, _sum_combine)
                den = g11 + g22 - 2.0 * g12
                gam = (g22 - g12) / tl.where(den > 0.0, den, 1.0)
                gam = tl.minimum(tl.maximum(gam, 0.0), 1.0)
                c2 = tl.where(ln == 0, gam, tl.where(ln == 1, 1.0 - gam, 0.0))
                c2 = tl.where(den <= 1e-12 * tl.maximum(g11, g22), tl.where(nmask, 0.5, 0.0), c2)
                c = tl.where(g_ok, c2, uniform)
                c = tl.where(N == 1, tl.where(ln == 0, 1.0, 0.0), c)
            elif WMODE == 1:
                ls = tl.arange(0, BLOCK_S)
                cobj = tl.load(cobj_ptr + ls, mask=ls < NS, other=float("inf"))
                _cmin, best = tl.reduce((cobj, ls), 0, _argmin_combine_tie_break_left)
                cb = tl.load(cand_ptr + best.to(tl.int64) * BN1 + ln, mask=nmask, other=0.0)
                cb = cb / tl.reduce(cb, 0, _sum_combine)
                cb = _split_duplicates(g, cb, N, BN)
                c = tl.where(g_ok, cb, uniform)
            else:
                c = tl.load(wgiven_ptr + ln, mask=nmask, other=0.0)
            gc = tl.reduce(g * c[None, :], 1, _sum_combine)
            objective = tl.reduce(c * gc, 0, _sum_combine)
            kkt = tl.maximum(objective - tl.reduce(tl.where(nmask, gc, float("inf")), 0, _elementwise_min), 0.0)
        else:
            q = tl.load(tot_ptr + OFF_S + 2 * N + ln, mask=nmask, other=0.0)
            a = q / tl.maximum(big_m, 1.0)
            c = _theorem1(a, nmask, N)
            ca = tl.reduce(c * a, 0, _sum_combine)
            objective = ca * ca
        tl.store(weights_ptr + ln, c.to(weights_ptr.dtype.element_ty), mask=nmask)
        s_tot = tl.load(tot_ptr + OFF_S + ln, mask=nmask, other=0.0)
        s_over_m = tl.load(tot_ptr + OFF_S + N + ln, mask=nmask, other=0.0)
        loss = tl.where(is_seq, -tl.reduce(c * s_over_m, 0, _sum_combine) * inv_ne, -tl.reduce(c * s_tot, 0, _sum_combine) * inv_m)
    elif GRAN == 2:  # sequence: weights and per-row sums came from reduce_rows_kernel
        objective = tl.load(tot_ptr + SLOT_SEQ_OBJ) * inv_ne
        loss = tl.where(is_seq, -tl.load(tot_ptr + SLOT_SEQ_LM) * inv_ne, -tl.load(tot_ptr + SLOT_SEQ_L) * inv_m)
    else:  # token
        loss = tl.where(is_seq, -tl.load(tot_ptr + SLOT_SMIN_M) * inv_ne, -tl.load(tot_ptr + SLOT_SMIN) * inv_m)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(stats_ptr + 0, big_m)
    tl.store(stats_ptr + 1, tl.load(tot_ptr + SLOT_CLIP))
    tl.store(stats_ptr + 2, tl.load(tot_ptr + SLOT_NF_LOGP))
    tl.store(stats_ptr + 3, tl.load(tot_ptr + SLOT_NF_OLD))
    tl.store(stats_ptr + 4, tl.load(tot_ptr + SLOT_NF_ADV))
    tl.store(stats_ptr + 5, objective)
    tl.store(stats_ptr + 6, kkt)
    tl.store(stats_ptr + 7, nonempty)
    lb = tl.arange(0, BLOCK_B)
    ne_c = tl.maximum(nonempty, 1.0)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + lb
        rm = rows < B
        m_b = tl.load(row_m_ptr + rows, mask=rm, other=0.0)
        per_seq = tl.where(m_b > 0.0, 1.0 / (ne_c * tl.maximum(m_b, 1.0)), 0.0)
        rs = tl.where(is_seq, per_seq, tl.zeros((BLOCK_B,), dtype=tl.float64) + inv_m)
        tl.store(row_scale_ptr + rows, rs.to(row_scale_ptr.dtype.element_ty), mask=rm)


# --------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["total", "T", "stride_ab", "stride_at", "stride_wb"], do_not_specialize_on_alignment=["N"])
def backward_kernel(
    grad_ptr,  # [] dL/dloss
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    weights_ptr,  # [N] or [B, N] (stride_wb) in acc dtype; unused for token
    row_scale_ptr,  # [B]
    out_ptr,  # [B, T] in logp's dtype
    total,  # B * T
    T,
    N,
    stride_ab,
    stride_at,
    stride_wb,  # 0: one weight vector; N: per-row weights
    thr_hi,
    thr_mid,
    thr_lo,
    CD: tl.constexpr,
    BN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADV_VEC: tl.constexpr,  # as in reduce_tokens_kernel: the strides come divided by it
    TOKEN_MIN: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid * BLOCK + tl.arange(0, BLOCK)  # int32: the host checks B * T < 2^31
    inb = g < total
    b = g // T
    t = g - b * T
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    ln = tl.arange(0, BN)
    nmask = ln < N
    thr_c = tl.cast(tl.cast(thr_hi, tl.float64) + tl.cast(thr_mid, tl.float64) + tl.cast(thr_lo, tl.float64), CD)
    mk = tl.load(mask_ptr + g, mask=inb, other=0) != 0
    lp = tl.load(logp_ptr + g, mask=inb, other=0.0).to(CD)
    old = tl.load(old_ptr + g, mask=inb, other=0.0).to(CD)
    aoff = (b64 * stride_ab + t64 * stride_at)[:, None] * ADV_VEC + ln[None, :]
    if ADV_VEC > 1:  # N == BN: no column to mask, the vector load stays whole
        amask = inb[:, None]
    else:
        amask = inb[:, None] & nmask[None, :]
    a = tl.load(adv_ptr + aoff, mask=amask, other=0.0).to(CD)
    fin_adv = tl.reduce((~(tl.abs(a) < float("inf"))).to(tl.int32), 1, _sum_combine) == 0
    valid = mk & (tl.abs(lp) < float("inf")) & (tl.abs(old) < float("inf")) & fin_adv
    d = tl.where(valid, lp - old, 0.0)
    if USE_LIBDEVICE:
        u = libdevice.exp(d)
    else:
        u = tl.exp(d)
    ind = u <= thr_c
    if TOKEN_MIN:
        s = _token_min(a, valid, nmask[None, :], 1)  # exactly-zero advantages abstain
    else:
        an = tl.where(valid[:, None], tl.maximum(a, 0.0), 0.0)
        w = tl.load(weights_ptr + b64[:, None] * stride_wb + ln[None, :], mask=inb[:, None] & nmask[None, :], other=0.0)
        s = tl.reduce(an * w.to(CD), 1, _sum_combine)
    go = tl.load(grad_ptr).to(CD)
    rs = tl.load(row_scale_ptr + b, mask=inb, other=0.0).to(CD)
    gr = -go * rs * s * u
    gr = tl.where(valid & ind, gr, 0.0)  # a select: u = inf gives 0, not NaN
    tl.store(out_ptr + g, gr.to(out_ptr.dtype.element_ty), mask=inb)
