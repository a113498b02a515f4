// gae_cpu.cpp: per-objective generalised advantage estimation (GAE) on CPU.
//
// The contract is the docstring of pama_ext/rl/gae.py (`gae_reference` is the executable
// form and the oracle this kernel is tested against):
//   rewards, values: [B, T, N], mask: [B, T] bool (response tokens).
//   Per row b and objective i, the trajectory is the masked positions of the row in order;
//   the value after the last one is 0 (terminal). Going backwards over those positions:
//     delta = r_t + gamma * V_next - V_t;  A_t = delta + gamma * lam * A_next;  R_t = A_t + V_t
//   and (A, R) = (0, 0) at every position outside the mask. Values and rewards outside the
//   mask are never read, so NaN padding cannot leak into the result.
//
// Layout and work split: a row is T * N contiguous numbers; rows are independent, so
// at::parallel_for splits over rows and each thread runs the recursion backwards over T with
// the N objectives innermost (contiguous loads and stores, N independent dependency chains).
// No cross-row reduction: the result is bitwise identical for any thread count.
//
// Precision: the recursion runs in float for float32 / bfloat16 / float16 and in double for
// float64 (the project's op type, as in pama_cpu.cpp); results are rounded to the input
// dtype once. The operations are in the order the reference writes them, so float32 agrees
// with it to a few ulps.
// Light ATen headers only, never <ATen/ATen.h> (cpu_ops.h says why): torch then
// fails the build if a header that pulls in every operator creeps back in.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "cpu_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// One row: the recursion backwards over T, the N objectives innermost. `next_v` and `last`
// are the state (V and A of the next masked token, 0 past the last one).
template <int kN, typename scalar_t, typename op_t>
inline void gae_row(const scalar_t* __restrict__ rew, const scalar_t* __restrict__ val, const bool* __restrict__ m,
                    scalar_t* __restrict__ adv, scalar_t* __restrict__ ret, int64_t T, int64_t N,
                    op_t* __restrict__ next_v, op_t* __restrict__ last, op_t gamma, op_t gamma_lam) {
  if (kN > 0) N = kN;  // a compile-time trip count: the inner loops unroll
  for (int64_t i = 0; i < N; ++i) next_v[i] = op_t(0), last[i] = op_t(0);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = t * N;
    if (!m[t]) {  // not part of the trajectory: skipped, outputs 0, inputs never read
      for (int64_t i = 0; i < N; ++i) adv[o + i] = scalar_t(0), ret[o + i] = scalar_t(0);
      continue;
    }
    for (int64_t i = 0; i < N; ++i) {
      const op_t v = static_cast<op_t>(val[o + i]);
      const op_t delta = static_cast<op_t>(rew[o + i]) + gamma * next_v[i] - v;
      const op_t a = delta + gamma_lam * last[i];
      last[i] = a;
      next_v[i] = v;
      adv[o + i] = static_cast<scalar_t>(a);
      ret[o + i] = static_cast<scalar_t>(a + v);
    }
  }
}

// Rows [b0, b1). kN > 0: N fixed at compile time, the state in local arrays (registers once
// unrolled: the __restrict__ pointers tell the compiler the output stores cannot touch it);
// kN == 0: any N, the state in one heap buffer per chunk of rows.
template <int kN, typename scalar_t, typename op_t>
void gae_rows(const scalar_t* rew, const scalar_t* val, const bool* mask, scalar_t* adv, scalar_t* ret, int64_t b0,
              int64_t b1, int64_t T, int64_t n_runtime, op_t gamma, op_t gamma_lam) {
  const int64_t N = kN > 0 ? kN : n_runtime;
  if constexpr (kN > 0) {
    op_t next_v[kN], last[kN];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * T * N;
      gae_row<kN>(rew + row, val + row, mask + b * T, adv + row, ret + row, T, N, next_v, last, gamma, gamma_lam);
    }
  } else {
    std::vector<op_t> state(2 * N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * T * N;
      gae_row<0>(rew + row, val + row, mask + b * T, adv + row, ret + row, T, N, state.data(), state.data() + N,
                 gamma, gamma_lam);
    }
  }
}

template <typename scalar_t, typename op_t>
void gae_dispatch_n(const scalar_t* rew, const scalar_t* val, const bool* mask, scalar_t* adv, scalar_t* ret,
                    int64_t b0, int64_t b1, int64_t T, int64_t N, op_t gamma, op_t gamma_lam) {
  switch (N) {
#define PAMA_GAE_CASE(n) \
  case n: return gae_rows<n>(rew, val, mask, adv, ret, b0, b1, T, N, gamma, gamma_lam);
    PAMA_GAE_CASE(1)
    PAMA_GAE_CASE(2)
    PAMA_GAE_CASE(3)
    PAMA_GAE_CASE(4)
    PAMA_GAE_CASE(5)
    PAMA_GAE_CASE(6)
    PAMA_GAE_CASE(7)
    PAMA_GAE_CASE(8)
#undef PAMA_GAE_CASE
    default: return gae_rows<0>(rew, val, mask, adv, ret, b0, b1, T, N, gamma, gamma_lam);
  }
}

void check_gae_inputs(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam) {
  TORCH_CHECK_VALUE(rewards.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(),
                    "gae: the CPU kernel needs CPU tensors, got rewards on ", rewards.device(), ", values on ",
                    values.device(), ", mask on ", mask.device());
  TORCH_CHECK_VALUE(rewards.dim() == 3, "gae: `rewards` must be [B, T, N], got ", rewards.sizes());
  TORCH_CHECK_VALUE(values.sizes() == rewards.sizes(), "gae: `values` must have the shape of `rewards` ",
                    rewards.sizes(), " ([B, T, N]), got ", values.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == rewards.size(0) && mask.size(1) == rewards.size(1),
                    "gae: `mask` must be [B, T] = [", rewards.size(0), ", ", rewards.size(1), "], got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, "gae: `mask` must be bool, got ", mask.scalar_type(),
                    " with shape ", mask.sizes());
  const auto st = rewards.scalar_type();
  TORCH_CHECK_VALUE(st == at::kDouble || st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "gae: `rewards` must be float64, float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(values.scalar_type() == st, "gae: `values` must have the dtype of `rewards` (", st, "), got ",
                    values.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, "gae: `gamma` must be in [0, 1], got ",
                    gamma);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, "gae: `lam` must be in [0, 1], got ", lam);
}

}  // namespace

namespace pama_cpu_ops {

std::tuple<Tensor, Tensor> gae(const Tensor& rewards_in, const Tensor& values_in, const Tensor& mask_in,
                               double gamma, double lam) {
  check_gae_inputs(rewards_in, values_in, mask_in, gamma, lam);
  const Tensor rewards = rewards_in.contiguous();
  const Tensor values = values_in.contiguous();
  const Tensor mask = mask_in.contiguous();
  const int64_t B = rewards.size(0), T = rewards.size(1), N = rewards.size(2);
  Tensor advantages = new_cpu_tensor(rewards.sizes(), rewards.scalar_type());
  Tensor returns = new_cpu_tensor(rewards.sizes(), rewards.scalar_type());
  if (rewards.numel() == 0) return {advantages, returns};
  // A few rows per task: enough work (>= ~32k numbers) to amortise the scheduling.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, T * N));
  const double gamma_lam = gamma * lam;  // one product in double, then rounded: as the reference
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae", [&] {
    using op_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* rew = rewards.data_ptr<scalar_t>();
    const scalar_t* val = values.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    scalar_t* adv = advantages.data_ptr<scalar_t>();
    scalar_t* ret = returns.data_ptr<scalar_t>();
    const op_t g = static_cast<op_t>(gamma), gl = static_cast<op_t>(gamma_lam);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      gae_dispatch_n<scalar_t, op_t>(rew, val, m, adv, ret, b0, b1, T, N, g, gl);
    });
  });
  return {advantages, returns};
}

}  // namespace pama_cpu_ops
