// pama_cuda.cpp: thin torch glue of the CUDA kernels (pama_cuda_kernels.cu). Built only when
// torch has CUDA (setup.py defines PAMA_WITH_CUDA); registered into pama_ext._C through
// register_cuda_bindings (csrc/bindings.h); pama_ext/_ops.py registers the functions as the
// CUDA kernels of pama_ext::pama_forward / pama_backward.
//
// Takes validated, contiguous tensors on one CUDA device (pama_ext/_ops.py normalises them),
// allocates outputs and the scratch with torch on that device (the caching allocator: no
// cudaMalloc per call), and launches on the current stream. No host synchronisation at all:
// nonfinite="raise" (check_finite=True) is served by pama_ext/_ops.py, which reads the three
// non-finite counts of the returned stats (one 24-byte read) and raises in Python.
#ifdef PAMA_WITH_CUDA

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "bindings.h"
#include "pama_checks.h"
#include "pama_cuda_kernels.h"

namespace {

using at::Tensor;

// pama_checks parses the options; its enums list them in the order of the kernels' plain ones
static_assert(int(pama_checks::Gran::Batch) == pama_cuda::kBatch &&
              int(pama_checks::Gran::Token) == pama_cuda::kToken &&
              int(pama_checks::Gran::Sequence) == pama_cuda::kSequence &&
              int(pama_checks::Gran::BatchMean) == pama_cuda::kBatchMean &&
              int(pama_checks::Gran::SequenceGram) == pama_cuda::kSequenceGram);
static_assert(int(pama_checks::Agg::TokenMean) == pama_cuda::kTokenMean &&
              int(pama_checks::Agg::SeqMeanTokenMean) == pama_cuda::kSeqMeanTokenMean);

pama_cuda::Gran gran_of(const std::string& g) {
  return static_cast<pama_cuda::Gran>(pama_checks::parse_granularity(g));
}

pama_cuda::Agg agg_of(const std::string& a) { return static_cast<pama_cuda::Agg>(pama_checks::parse_loss_agg(a)); }

// the kernels' dtype of an input that check_inputs accepted
pama_cuda::DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kDouble: return pama_cuda::kFloat64;
    case at::kFloat: return pama_cuda::kFloat32;
    case at::kBFloat16: return pama_cuda::kBFloat16;
    case at::kHalf: return pama_cuda::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "pama_loss: `logp` must be float64, float32, bfloat16 or float16, got ", st);
  }
  return pama_cuda::kFloat32;
}

// The CUDA glue's side of the checks shared with the CPU kernels (pama_checks.h).
bool on_logp_cuda_device(const Tensor& logp, const Tensor& x) {
  return logp.is_cuda() && x.device() == logp.device();
}
constexpr pama_checks::Target kCudaTarget{&on_logp_cuda_device, "the CUDA kernel needs every input on one CUDA device",
                                          pama_cuda::kMaxN, /*joint_shape_message=*/true,
                                          /*dtype_error_name=*/"pama_loss"};

pama_cuda::Inputs inputs_of(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages, const Tensor& mask,
                            double clip_eps) {
  pama_cuda::Inputs in;
  in.logp = logp.data_ptr();
  in.old_logp = old_logp.data_ptr();
  in.adv = advantages.data_ptr();
  in.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  in.B = logp.size(0);
  in.T = logp.size(1);
  in.n = static_cast<int>(advantages.size(-1));
  in.broadcast = advantages.dim() == 2;
  in.dtype = dtype_of(logp.scalar_type());
  in.clip_eps = clip_eps;
  return in;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pama_forward_cuda(const Tensor& logp, const Tensor& old_logp,
                                                            const Tensor& advantages, const Tensor& mask,
                                                            double clip_eps, const std::string& granularity,
                                                            const std::string& loss_agg) {
  pama_checks::check_inputs(kCudaTarget, "pama_forward", logp, old_logp, advantages, mask);
  const auto gran = gran_of(granularity);
  const auto agg = agg_of(loss_agg);
  pama_checks::check_clip_eps(clip_eps);
  const c10::cuda::CUDAGuard guard(logp.device());
  const int64_t B = logp.size(0), T = logp.size(1);
  const int n = static_cast<int>(advantages.size(-1));
  const auto acc = pama_checks::acc_dtype_of(logp);
  const auto opt = logp.options().dtype(acc);
  Tensor loss = at::empty({}, opt);
  // token: the [B, T] per-token gradient factor (written in full by the reduction kernel)
  Tensor weights = gran == pama_cuda::kToken      ? at::empty({B, T}, opt)
                   : gran == pama_cuda::kSequence ? at::empty({B, n}, opt)
                                                  : at::empty({n}, opt);
  Tensor row_scale = at::empty({B}, opt);
  Tensor stats = at::empty({8}, logp.options().dtype(at::kDouble));
  const size_t ws_bytes = pama_cuda::forward_workspace_bytes(B, T, n, gran);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, logp.options().dtype(at::kByte));
  pama_cuda::ForwardOutputs out{loss.data_ptr(), weights.numel() ? weights.data_ptr() : nullptr,
                                row_scale.numel() ? row_scale.data_ptr() : nullptr, stats.data_ptr<double>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logp.device().index()).stream();
  const cudaError_t err = pama_cuda::launch_forward(inputs_of(logp, old_logp, advantages, mask, clip_eps), gran, agg,
                                                    out, ws.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "pama_forward (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  // No host synchronisation and no raise here: pama_ext/_ops.py reads stats[2:5] and raises
  // the nonfinite="raise" ValueError in Python (the one documented sync of that mode).
  return {loss, weights, row_scale, stats};
}

Tensor pama_backward_cuda(const Tensor& grad_loss, const Tensor& logp, const Tensor& old_logp,
                          const Tensor& advantages, const Tensor& mask, const Tensor& weights, const Tensor& row_scale,
                          double clip_eps, const std::string& granularity) {
  pama_checks::check_inputs(kCudaTarget, "pama_backward", logp, old_logp, advantages, mask);
  const auto gran = gran_of(granularity);
  const c10::cuda::CUDAGuard guard(logp.device());
  const int64_t B = logp.size(0);
  const int n = static_cast<int>(advantages.size(-1));
  const auto acc = pama_checks::acc_dtype_of(logp);
  pama_checks::check_grad_loss(grad_loss);
  // all on the device, no host copy: the kernel reads grad_loss through a pointer
  const Tensor go = grad_loss.to(logp.device(), at::kDouble).reshape({1}).contiguous();
  const Tensor rs = row_scale.to(logp.device(), acc).contiguous();
  pama_checks::check_row_scale(rs, B);
  Tensor wc;
  if (gran != pama_cuda::kToken) {
    wc = weights.to(logp.device(), acc).contiguous();
    const bool per_row = gran == pama_cuda::kSequence;
    pama_checks::check_weights(wc, B, n, per_row, granularity);
  }
  Tensor grad = at::empty_like(logp);
  if (logp.numel() == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logp.device().index()).stream();
  const cudaError_t err = pama_cuda::launch_backward(inputs_of(logp, old_logp, advantages, mask, clip_eps), gran,
                                                     go.data_ptr<double>(), wc.defined() ? wc.data_ptr() : nullptr,
                                                     rs.data_ptr(), grad.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "pama_backward (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace

void register_cuda_bindings(pybind11::module_& m) {
  m.def("pama_forward_cuda", &pama_forward_cuda,
        "CUDA: one reduction kernel + a single-block finalise: (loss, weights, row_scale, stats)", py::arg("logp"),
        py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("clip_eps"), py::arg("granularity"),
        py::arg("loss_agg"));
  m.def("pama_backward_cuda", &pama_backward_cuda, "CUDA: one elementwise kernel: grad_logp", py::arg("grad_loss"),
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("weights"),
        py::arg("row_scale"), py::arg("clip_eps"), py::arg("granularity"));
}

int pama_cuda_runtime_version() { return pama_cuda::compiled_cuda_version(); }

#endif  // PAMA_WITH_CUDA
