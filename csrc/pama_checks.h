// pama_checks.h: the argument checks and option parsing of the fused op, shared by the CPU
// kernels (pama_cpu.cpp) and the CUDA glue (pama_cuda.cpp).
//
// pama_ext/_ops.py validates and normalises every input before it calls a kernel, so these
// checks guard the op contract (csrc/README.md) against a direct pama_ext._C call: past
// them, a kernel may read raw pointers with the sizes it is given.
//
// Header-only, and only CPU torch headers: the CPU-only build has no CUDA headers, and the
// CUDA glue includes the same code. What differs between the two callers is a `Target`
// (below). Error texts are part of the behaviour, so both callers keep their wording
// word for word, including the two messages the files had grown apart on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace pama_checks {

// What one kernel family requires of its inputs, beyond the op contract.
struct Target {
  // whether input `x` is where the kernel can read it (asked for logp itself too)
  bool (*on_device)(const at::Tensor& logp, const at::Tensor& x);
  const char* device_error;  // the RuntimeError's text after "<fn>: "
  int64_t max_n;             // the most objectives the kernels take
  // The CUDA glue reports a wrong `old_logp` or `mask` shape in one message and names the
  // float-dtype error "pama_loss"; the CPU kernels have a message per tensor and name it <fn>.
  bool joint_shape_message;
  const char* dtype_error_name;  // nullptr: <fn>
};

// The options in the order of pama_cuda::Gran / pama_cuda::Agg (pama_cuda.cpp casts them).
enum class Gran { Batch, Token, Sequence, BatchMean, SequenceGram };
enum class Agg { TokenMean, SeqMeanTokenMean };

inline Gran parse_granularity(const std::string& g) {
  if (g == "batch") return Gran::Batch;
  if (g == "token") return Gran::Token;
  if (g == "sequence") return Gran::Sequence;
  if (g == "batch_mean") return Gran::BatchMean;
  if (g == "sequence_gram") return Gran::SequenceGram;
  TORCH_CHECK_VALUE(false, "pama_loss: unknown granularity '", g,
                    "'; expected one of 'batch', 'token', 'sequence', 'batch_mean', 'sequence_gram'");
  return Gran::Batch;
}

inline Agg parse_loss_agg(const std::string& a) {
  if (a == "token_mean") return Agg::TokenMean;
  if (a == "seq_mean_token_mean") return Agg::SeqMeanTokenMean;
  TORCH_CHECK_VALUE(false, "pama_loss: unknown loss_agg '", a,
                    "'; expected one of 'token_mean', 'seq_mean_token_mean'");
  return Agg::TokenMean;
}

// The accumulation dtype of the contract: float64 for float64 inputs, else float32.
inline at::ScalarType acc_dtype_of(const at::Tensor& logp) {
  return logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// logp, old_logp: [B, T]; advantages: [B, T, N] or [B, N], 1 <= N <= max_n; mask: [B, T]
// bool; one floating dtype; all contiguous and where `target` reads them. `fn` names the op.
inline void check_inputs(const Target& target, const char* fn, const at::Tensor& logp, const at::Tensor& old_logp,
                         const at::Tensor& advantages, const at::Tensor& mask) {
  TORCH_CHECK(target.on_device(logp, logp) && target.on_device(logp, old_logp) &&
                  target.on_device(logp, advantages) && target.on_device(logp, mask),
              fn, ": ", target.device_error);
  TORCH_CHECK_VALUE(logp.dim() == 2, fn, ": `logp` must be [B, T], got ", logp.sizes());
  if (target.joint_shape_message) {
    TORCH_CHECK_VALUE(old_logp.sizes() == logp.sizes() && mask.sizes() == logp.sizes(), fn,
                      ": `old_logp` and `mask` must have the shape of `logp` ", logp.sizes());
  } else {
    TORCH_CHECK_VALUE(old_logp.sizes() == logp.sizes(), fn, ": `old_logp` must have the shape of `logp` ",
                      logp.sizes(), ", got ", old_logp.sizes());
    TORCH_CHECK_VALUE(mask.sizes() == logp.sizes(), fn, ": `mask` must have the shape of `logp` ", logp.sizes(),
                      ", got ", mask.sizes());
  }
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, fn, ": `mask` must be bool, got ", mask.scalar_type());
  const auto st = logp.scalar_type();
  TORCH_CHECK_VALUE(st == at::kDouble || st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    target.dtype_error_name ? target.dtype_error_name : fn,
                    ": `logp` must be float64, float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(old_logp.scalar_type() == st && advantages.scalar_type() == st, fn,
                    ": `logp`, `old_logp` and `advantages` must share one dtype");
  const int64_t B = logp.size(0), T = logp.size(1);
  const bool ok_adv = (advantages.dim() == 3 && advantages.size(0) == B && advantages.size(1) == T) ||
                      (advantages.dim() == 2 && advantages.size(0) == B);
  TORCH_CHECK_VALUE(ok_adv, fn, ": `advantages` must be [B, T, N] or [B, N] with [B, T] = ", logp.sizes(),
                    ", got ", advantages.sizes());
  const int64_t n = advantages.size(-1);
  TORCH_CHECK_VALUE(n >= 1 && n <= target.max_n, fn, ": the number of objectives N must be in [1, ", target.max_n,
                    "], got ", n);
  TORCH_CHECK_VALUE(logp.is_contiguous() && old_logp.is_contiguous() && advantages.is_contiguous() &&
                        mask.is_contiguous(),
                    fn, ": inputs must be contiguous");
}

inline void check_clip_eps(double clip_eps) {
  TORCH_CHECK_VALUE(std::isfinite(clip_eps) && clip_eps > 0.0, "pama_loss: clip_eps must be a finite number > 0, got ",
                    clip_eps);
}

// The backward's other arguments: the upstream gradient of the 0-dim loss, and the forward's
// row scales and weights (after the caller's conversion to the acc dtype).
inline void check_grad_loss(const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "pama_backward: grad_loss must hold one value");
}

inline void check_row_scale(const at::Tensor& row_scale, int64_t B) {
  TORCH_CHECK_VALUE(row_scale.numel() == B, "pama_backward: row_scale must be [B]");
}

// per_row: `sequence`'s [B, N] weights; else [N] (never called for `token`, which has none)
inline void check_weights(const at::Tensor& weights, int64_t B, int64_t n, bool per_row,
                          const std::string& granularity) {
  TORCH_CHECK_VALUE(weights.numel() == (per_row ? B * n : n), "pama_backward: weights must be ",
                    per_row ? "[B, N]" : "[N]", " for granularity '", granularity, "'");
}

}  // namespace pama_checks
