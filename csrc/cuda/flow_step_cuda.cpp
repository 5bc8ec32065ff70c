// Flow-matching GRPO step: torch binding of the CUDA kernels (flow_step_kernels.{h,cu}).
//
// Same signatures, argument checks, output shapes and dtypes as the CPU kernels
// (csrc/cpu/flow_step.cpp); the outputs and the kernels' scratch are allocated with torch on the
// latents' device and the kernels run on the current CUDA stream. Compiled only when torch has
// CUDA (setup.py adds csrc/cuda/*_cuda.cpp to the CUDAExtension).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "flow_step_kernels.h"

namespace tbk {
namespace {

constexpr int64_t kReduceMean = 0, kReduceChannelSum = 1, kReduceNone = 2;
static_assert(kReduceMean == cuda::kFlowReduceMean &&
                  kReduceChannelSum == cuda::kFlowReduceChannelSum &&
                  kReduceNone == cuda::kFlowReduceNone,
              "reduction codes of the schema and of the kernels differ");

struct Layout {
  int64_t B, C, S;  // latent [B, C, S], S = product of the dims after C
};

Layout check_latents(const at::Tensor& v, const at::Tensor& x, const char* op) {
  TORCH_CHECK(v.dim() >= 3, op, ": model_output must be [B, C, (T,) H, W], got ", v.sizes());
  TORCH_CHECK(x.sizes() == v.sizes(), op, ": sample ", x.sizes(), " must match model_output ",
              v.sizes());
  TORCH_CHECK(x.scalar_type() == v.scalar_type(), op, ": sample and model_output dtypes differ");
  TORCH_CHECK(v.is_contiguous() && x.is_contiguous(), op, ": latents must be contiguous");
  TORCH_CHECK(v.is_cuda(), op, " (cuda): tensors must be on a CUDA device");
  TORCH_CHECK(x.device() == v.device(), op, ": sample must be on model_output's device ",
              v.device(), ", got ", x.device());
  int64_t S = 1;
  for (int64_t d = 2; d < v.dim(); ++d) S *= v.size(d);
  return {v.size(0), v.size(1), S};
}

void check_like(const std::optional<at::Tensor>& t, const at::Tensor& v, const char* what,
                const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == v.sizes() && t->scalar_type() == v.scalar_type() &&
                  t->is_contiguous() && t->device() == v.device(),
              op, ": ", what, " must be a contiguous tensor like model_output ", v.sizes(), " ",
              v.scalar_type(), ", got ", t->sizes(), " ", t->scalar_type());
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

std::vector<int64_t> logp_shape(const at::Tensor& v, int64_t reduction) {
  if (reduction == kReduceMean) return {v.size(0)};
  std::vector<int64_t> shape(v.sizes().begin(), v.sizes().end());
  if (reduction == kReduceChannelSum) shape.erase(shape.begin() + 1);
  return shape;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

cuda::DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": latents must be float32, float64, float16 or bfloat16, got ", t);
  return cuda::DType::kFloat32;  // not reached
}

void check_coefs(const at::Tensor& coefs, const at::Tensor& v, const char* op) {
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == v.size(0) && coefs.size(1) == 5 &&
                  coefs.is_contiguous() && coefs.scalar_type() == acc_type(v.scalar_type()),
              op, ": coefs must be a contiguous [B, 5] ", acc_type(v.scalar_type()),
              " tensor, got ", coefs.sizes(), " ", coefs.scalar_type());
  TORCH_CHECK(coefs.device() == v.device(), op, ": coefs must be on the latents' device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_step_forward_cuda(
    const at::Tensor& v, const at::Tensor& x, const std::optional<at::Tensor>& prev_or_noise,
    const std::optional<at::Tensor>& ref, const at::Tensor& coefs, int64_t reduction,
    bool sampling, bool write_mean) {
  const char* op = "flow_step_forward";
  const Layout L = check_latents(v, x, op);
  check_like(prev_or_noise, v, sampling ? "noise" : "prev_sample", op);
  check_like(ref, v, "ref_model_output", op);
  check_coefs(coefs, v, op);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0, 1 or 2");
  const cuda::DType dtype = kernel_dtype(v.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(v.device());

  const auto acc = acc_type(v.scalar_type());
  at::Tensor logp = at::empty(logp_shape(v, reduction), v.options().dtype(acc));
  at::Tensor ref_sq = at::empty({L.B}, v.options().dtype(acc));
  at::Tensor mean = write_mean ? at::empty_like(v) : at::empty({0}, v.options());
  at::Tensor prev = sampling ? at::empty_like(v) : at::empty({0}, v.options());

  cuda::FlowStepForwardArgs args;
  args.dtype = dtype;
  args.batch = L.B;
  args.channels = L.C;
  args.spatial = L.S;
  args.model_output = v.data_ptr();
  args.sample = x.data_ptr();
  args.prev_or_noise = opt_ptr(prev_or_noise);
  args.ref_model_output = opt_ptr(ref);
  args.coefs = coefs.data_ptr();
  args.reduction = static_cast<int>(reduction);
  args.sampling = sampling;
  args.logp = logp.data_ptr();
  args.ref_sq = ref_sq.data_ptr();
  args.mean_out = write_mean ? mean.data_ptr() : nullptr;
  args.prev_out = sampling ? prev.data_ptr() : nullptr;
  const size_t ws_bytes = cuda::flow_step_forward_workspace_bytes(args);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, v.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(cuda::flow_step_forward(args, at::cuda::getCurrentCUDAStream()));
  return {logp, ref_sq, mean, prev};
}

at::Tensor flow_step_backward_cuda(const at::Tensor& v, const at::Tensor& x,
                                   const std::optional<at::Tensor>& prev,
                                   const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
                                   int64_t reduction, const std::optional<at::Tensor>& grad_logp,
                                   const std::optional<at::Tensor>& grad_mean,
                                   const std::optional<at::Tensor>& grad_ref_sq) {
  const char* op = "flow_step_backward";
  const Layout L = check_latents(v, x, op);
  check_like(prev, v, "prev_sample", op);
  check_like(ref, v, "ref_model_output", op);
  check_like(grad_mean, v, "grad_mean", op);
  check_coefs(coefs, v, op);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0, 1 or 2");
  const cuda::DType dtype = kernel_dtype(v.scalar_type(), op);
  const auto acc = acc_type(v.scalar_type());
  if (grad_logp.has_value()) {
    const auto expect = logp_shape(v, reduction);
    TORCH_CHECK(grad_logp->sizes() == at::IntArrayRef(expect) && grad_logp->is_contiguous() &&
                    grad_logp->scalar_type() == acc,
                op, ": grad_logp must be a contiguous ", at::IntArrayRef(expect), " ", acc,
                " tensor, got ", grad_logp->sizes(), " ", grad_logp->scalar_type());
    TORCH_CHECK(grad_logp->device() == v.device(), op,
                ": grad_logp must be on the latents' device");
  }
  if (grad_ref_sq.has_value()) {
    TORCH_CHECK(ref.has_value(), op, ": grad_ref_sq given without ref_model_output");
    TORCH_CHECK(grad_ref_sq->numel() == L.B && grad_ref_sq->is_contiguous() &&
                    grad_ref_sq->scalar_type() == acc,
                op, ": grad_ref_sq must be a contiguous [B] ", acc, " tensor");
    TORCH_CHECK(grad_ref_sq->device() == v.device(), op,
                ": grad_ref_sq must be on the latents' device");
  }
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor grad_v = at::empty_like(v);

  cuda::FlowStepBackwardArgs args;
  args.dtype = dtype;
  args.batch = L.B;
  args.channels = L.C;
  args.spatial = L.S;
  args.model_output = v.data_ptr();
  args.sample = x.data_ptr();
  args.prev_sample = opt_ptr(prev);
  args.ref_model_output = opt_ptr(ref);
  args.coefs = coefs.data_ptr();
  args.reduction = static_cast<int>(reduction);
  args.grad_logp = opt_ptr(grad_logp);
  args.grad_mean = opt_ptr(grad_mean);
  args.grad_ref_sq = opt_ptr(grad_ref_sq);
  args.grad_v = grad_v.data_ptr();
  C10_CUDA_CHECK(cuda::flow_step_backward(args, at::cuda::getCurrentCUDAStream()));
  return grad_v;
}

}  // namespace
}  // namespace tbk

TORCH_LIBRARY_IMPL(tbkernels, CUDA, m) {
  m.impl("flow_step_forward", &tbk::flow_step_forward_cuda);
  m.impl("flow_step_backward", &tbk::flow_step_backward_cuda);
}
