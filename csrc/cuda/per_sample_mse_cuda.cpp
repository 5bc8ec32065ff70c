// Per-sample MSE: torch binding of the CUDA kernels (per_sample_mse_kernels.{h,cu}).
//
// Same signatures, argument checks, output shapes and dtypes as the CPU kernels
// (csrc/cpu/per_sample_mse.cpp, which also declares the schemas); outputs and the kernels'
// scratch are allocated with torch on the inputs' device and the kernels run on the current CUDA
// stream. Compiled only when torch has CUDA (setup.py adds csrc/cuda/*_cuda.cpp).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_scratch.h"
#include "per_sample_mse_kernels.h"

namespace tbk {
namespace {

cuda::DType kernel_dtype(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", what, " must be float32, float64, float16 or bfloat16, got ", t);
  return cuda::DType::kFloat32;  // not reached
}

at::ScalarType acc_type(const at::Tensor& pred, const at::Tensor& target) {
  return (pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble) ? at::kDouble
                                                                                   : at::kFloat;
}

// Returns (B, D).
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& pred, const at::Tensor& target,
                                         const char* op) {
  TORCH_CHECK(pred.dim() >= 1, op, ": pred must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target ", target.sizes(),
              " must have pred's shape ", pred.sizes());
  TORCH_CHECK(pred.is_contiguous() && target.is_contiguous(), op,
              ": pred and target must be contiguous");
  TORCH_CHECK(pred.is_cuda(), op, " (cuda): tensors must be on a CUDA device");
  TORCH_CHECK(target.device() == pred.device(), op, ": target must be on pred's device ",
              pred.device(), ", got ", target.device());
  const int64_t B = pred.size(0);
  return {B, B == 0 ? 0 : pred.numel() / B};
}

at::Tensor per_sample_mse_cuda(const at::Tensor& pred, const at::Tensor& target) {
  const char* op = "per_sample_mse";
  const auto [B, D] = check_inputs(pred, target, op);
  cuda::PerSampleMseForwardArgs args;
  args.pred_dtype = kernel_dtype(pred.scalar_type(), op, "pred");
  args.target_dtype = kernel_dtype(target.scalar_type(), op, "target");
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor out = at::empty({B}, pred.options().dtype(acc_type(pred, target)));
  args.batch = B;
  args.per_sample = D;
  args.pred = pred.data_ptr();
  args.target = target.data_ptr();
  args.out = out.data_ptr();
  const at::Tensor workspace =  // alive until the kernels are queued
      cuda_scratch(cuda::per_sample_mse_forward_workspace_bytes(args), pred, &args.workspace);
  C10_CUDA_CHECK(cuda::per_sample_mse_forward(args, at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor per_sample_mse_backward_cuda(const at::Tensor& grad_out, const at::Tensor& pred,
                                        const at::Tensor& target) {
  const char* op = "per_sample_mse_backward";
  const auto [B, D] = check_inputs(pred, target, op);
  const auto acc = acc_type(pred, target);
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == B && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == acc && grad_out.device() == pred.device(),
              op, ": grad_out must be a contiguous [", B, "] ", acc, " tensor on ", pred.device(),
              ", got ", grad_out.sizes(), " ", grad_out.scalar_type(), " on ", grad_out.device());
  cuda::PerSampleMseBackwardArgs args;
  args.pred_dtype = kernel_dtype(pred.scalar_type(), op, "pred");
  args.target_dtype = kernel_dtype(target.scalar_type(), op, "target");
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad = at::empty_like(pred);
  args.batch = B;
  args.per_sample = D;
  args.grad_out = grad_out.data_ptr();
  args.pred = pred.data_ptr();
  args.target = target.data_ptr();
  args.grad_pred = grad.data_ptr();
  C10_CUDA_CHECK(cuda::per_sample_mse_backward(args, at::cuda::getCurrentCUDAStream()));
  return grad;
}

}  // namespace
}  // namespace tbk

TORCH_LIBRARY_IMPL(tbkernels, CUDA, m) {
  m.impl("per_sample_mse", &tbk::per_sample_mse_cuda);
  m.impl("per_sample_mse_backward", &tbk::per_sample_mse_backward_cuda);
}
