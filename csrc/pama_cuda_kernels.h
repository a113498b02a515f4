// pama_cuda_kernels.h: launchers of the fused PAMA CUDA kernels (pama_cuda_kernels.cu).
//
// Plain CUDA, no torch headers: raw pointers, sizes, a dtype enum, caller-provided scratch
// and a cudaStream_t, so that the kernels compile with any nvcc and the torch glue
// (pama_cuda.cpp) stays thin. This header is host-includable (g++ with the CUDA include
// directory); only the .cu file needs nvcc.
//
// Contract: csrc/README.md (the same op as the CPU kernels):
//   forward  = one reduction kernel (grid over fixed token units that never cross a
//              sequence; each block reduces in registers / shared memory in a fixed tree and
//              writes its own scratch slot) + one single-block finalise kernel (sums the
//              slots in a fixed order, solves: pama::min_norm_weights for `batch` (the
//              token Gram) and `sequence_gram` (the Gram of the per-row mean vectors),
//              pama::theorem1 for `batch_mean` / `sequence`, writes loss, weights,
//              row_scale, stats). For `token` the reduction kernel itself writes the weights:
//              the [B, T] per-token gradient factor. No float atomics anywhere: equal inputs
//              give bitwise-equal outputs. No host synchronisation.
//   backward = one elementwise kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace pama_cuda {

enum DType : int { kFloat64 = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };
enum Gran : int { kBatch = 0, kToken = 1, kSequence = 2, kBatchMean = 3, kSequenceGram = 4 };
enum Agg : int { kTokenMean = 0, kSeqMeanTokenMean = 1 };

constexpr int kMaxN = 64;             // = PAMA_MAX_N
constexpr int64_t kBlockTokens = 2048;  // tokens per reduction unit (one CUDA block)
constexpr int kThreads = 256;         // threads of a reduction / write block
constexpr int kFinaliseThreads = 512;  // threads of the single finalise block

// Inputs of both passes. logp, old_logp: [B, T]; adv: [B, T, N] or (broadcast) [B, N];
// mask: [B, T] bool read as bytes; all contiguous, logp/old_logp/adv of dtype `dtype`.
struct Inputs {
  const void* logp;
  const void* old_logp;
  const void* adv;
  const uint8_t* mask;
  int64_t B;
  int64_t T;
  int n;
  bool broadcast;  // adv is [B, N]
  DType dtype;
  double clip_eps;
};

// Outputs of the forward pass, all on the device. acc = float64 for float64 inputs, else
// float32 (the pointers below are of that type).
struct ForwardOutputs {
  void* loss;       // acc, 1 value
  // acc, [N] (batch, batch_mean, sequence_gram), [B, N] (sequence), [B, T] (token: the
  // per-token gradient factor f[b, t] = s_t * u_t if the token is valid and u_t <= 1+eps, else
  // 0 -- s_t = pama::token_min of the raw advantages, u_t = exp(logp - old_logp), the product
  // formed in acc; every element written, by the reduction kernel)
  void* weights;
  void* row_scale;  // acc, [B]
  double* stats;    // float64, [8]
};

// Bytes of device scratch the forward pass needs (deterministic slots, per-row partials and
// the solver's workspace). Allocate at least this many bytes (any alignment >= 256).
size_t forward_workspace_bytes(int64_t B, int64_t T, int n, Gran gran);

// Runs the forward pass on `stream`. Returns cudaSuccess or the launch error; never
// synchronises. `workspace` must hold forward_workspace_bytes(...) bytes.
cudaError_t launch_forward(const Inputs& in, Gran gran, Agg agg, const ForwardOutputs& out, void* workspace,
                           cudaStream_t stream);

// Runs the backward pass: grad[b, t] = -grad_loss * row_scale[b] * s_t * (u_t <= 1+eps ? u_t : 0)
// for valid tokens, 0 elsewhere. grad_loss: 1 float64 on the device (read by the kernel, no
// host copy); weights / row_scale: acc dtype on the device (weights: not read for token --
// this kernel recomputes s_t; [B, N] for sequence); grad: [B, T] of the input dtype.
cudaError_t launch_backward(const Inputs& in, Gran gran, const double* grad_loss, const void* weights,
                            const void* row_scale, void* grad, cudaStream_t stream);

// CUDART_VERSION the kernels were compiled with (e.g. 13000 for CUDA 13.0).
int compiled_cuda_version();

}  // namespace pama_cuda
