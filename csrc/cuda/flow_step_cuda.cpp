// Flow-matching GRPO step: torch binding of the CUDA kernels (flow_step_kernels.{h,cu}).
//
// Same signatures, argument checks, output shapes and dtypes as the CPU kernels
// (csrc/cpu/flow_step.cpp). The kernels' latent dtype is sample's, their model dtype
// model_output's (the same, or bfloat16 / float16 beside float32 latents: flow_step_kernels.h);
// mean and the sampled prev come out in sample's dtype, grad_v in model_output's. The outputs
// and the kernels' scratch are allocated with torch on the latents' device and the kernels run
// on the current CUDA stream. Latent inputs whose samples are
// each contiguous (trajectory slices, batch-expanded tensors) go to the kernels in place, with
// their batch strides, and so do the map losses' old_log_prob and advantage_map whose rows are
// each contiguous, with their row strides. Compiled only when torch has CUDA (setup.py adds
// csrc/cuda/*_cuda.cpp to the CUDAExtension).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../flow_step_checks.h"
#include "binding_scratch.h"
#include "flow_step_kernels.h"

namespace tbk {
namespace {

using flow_step::Layout;
static_assert(flow_step::kReduceMean == cuda::kFlowReduceMean &&
                  flow_step::kReduceChannelSum == cuda::kFlowReduceChannelSum &&
                  flow_step::kReduceNone == cuda::kFlowReduceNone,
              "reduction codes of the schema and of the kernels differ");

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

cuda::DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": latents and model_output must be float32, float64, float16 or "
              "bfloat16, got ", t);
  return cuda::DType::kFloat32;  // not reached
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_step_forward_cuda(
    const at::Tensor& v, const at::Tensor& x, const std::optional<at::Tensor>& prev_or_noise,
    const std::optional<at::Tensor>& ref, const at::Tensor& coefs, int64_t reduction,
    bool sampling, bool write_mean) {
  const char* op = "flow_step_forward";
  const Layout L = flow_step::check_forward_args(v, x, prev_or_noise, ref, coefs, reduction,
                                                 sampling, c10::DeviceType::CUDA);
  const cuda::DType dtype = kernel_dtype(x.scalar_type(), op);
  const cuda::DType model_dtype = kernel_dtype(v.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(v.device());

  const auto acc = flow_step::acc_type(x.scalar_type());
  at::Tensor logp = at::empty(flow_step::logp_shape(v, reduction), x.options().dtype(acc));
  at::Tensor ref_sq = at::empty({L.B}, x.options().dtype(acc));
  // mean and the sampled prev are latents: contiguous, in sample's dtype
  at::Tensor mean = write_mean ? at::empty(v.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor prev = sampling ? at::empty(v.sizes(), x.options()) : at::empty({0}, x.options());

  cuda::FlowStepForwardArgs args;
  args.dtype = dtype;
  args.model_dtype = model_dtype;
  args.batch = L.B;
  args.channels = L.C;
  args.spatial = L.S;
  args.model_output = v.data_ptr();
  args.sample = x.data_ptr();
  args.prev_or_noise = opt_ptr(prev_or_noise);
  args.ref_model_output = opt_ptr(ref);
  const flow_step::BatchStrides bs = flow_step::batch_strides(L, v, x, prev_or_noise, ref);
  args.model_output_bstride = bs.v;
  args.sample_bstride = bs.x;
  args.prev_bstride = bs.prev;
  args.ref_bstride = bs.ref;
  args.coefs = coefs.data_ptr();
  args.reduction = static_cast<int>(reduction);
  args.sampling = sampling;
  args.logp = logp.data_ptr();
  args.ref_sq = ref_sq.data_ptr();
  args.mean_out = write_mean ? mean.data_ptr() : nullptr;
  args.prev_out = sampling ? prev.data_ptr() : nullptr;
  const at::Tensor workspace =  // alive until the kernels are queued
      cuda_scratch(cuda::flow_step_forward_workspace_bytes(args), v, &args.workspace);
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
  const Layout L = flow_step::check_backward_args(v, x, prev, ref, coefs, reduction, grad_logp,
                                                  grad_mean, grad_ref_sq, c10::DeviceType::CUDA);
  const cuda::DType dtype = kernel_dtype(x.scalar_type(), op);
  const cuda::DType model_dtype = kernel_dtype(v.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor grad_v = flow_step::latent_output(v);  // model_output's dtype

  cuda::FlowStepBackwardArgs args;
  args.dtype = dtype;
  args.model_dtype = model_dtype;
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
  const flow_step::BatchStrides bs = flow_step::batch_strides(L, v, x, prev, ref, grad_mean);
  args.model_output_bstride = bs.v;
  args.sample_bstride = bs.x;
  args.prev_bstride = bs.prev;
  args.ref_bstride = bs.ref;
  args.grad_mean_bstride = bs.grad_mean;
  args.grad_v = grad_v.data_ptr();
  C10_CUDA_CHECK(cuda::flow_step_backward(args, at::cuda::getCurrentCUDAStream()));
  return grad_v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_grpo_surrogate_cuda(
    const at::Tensor& logp, const std::optional<at::Tensor>& ref_sq,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, double clip_range, double adv_clip_max, double beta,
    bool simple) {
  const int64_t B = flow_step::check_surrogate_args(logp, ref_sq, kl_weight, old_log_prob,
                                                    advantages, clip_range, adv_clip_max,
                                                    c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor loss, metrics, factors;
  std::tie(loss, metrics, factors) = flow_step::surrogate_outputs(logp);
  cuda::FlowGrpoSurrogateArgs args;
  args.acc = logp.scalar_type() == at::kDouble ? cuda::DType::kFloat64 : cuda::DType::kFloat32;
  args.batch = B;
  args.logp = logp.data_ptr();
  args.ref_sq = opt_ptr(ref_sq);
  args.kl_weight = opt_ptr(kl_weight);
  args.old_log_prob = old_log_prob.data_ptr();
  args.advantages = advantages.data_ptr();
  args.clip_range = clip_range;
  args.adv_clip_max = adv_clip_max;
  args.beta = beta;
  args.simple = simple;
  args.loss = loss.data_ptr();
  args.metrics = metrics.data_ptr();
  args.factors = factors.data_ptr();
  C10_CUDA_CHECK(cuda::flow_grpo_surrogate(args, at::cuda::getCurrentCUDAStream()));
  return {loss, metrics, factors};
}

// The fields flow_grpo_map_surrogate's and flow_grpo_elem_loss's argument structs share: the
// [B, n] old log-prob and map (read at their row strides: trajectory slices [:, j], expanded
// rows; checked to have contiguous rows), the surrogate's constants and the loss / metrics.
template <typename Args>
void set_map_loss_fields(Args& args, const at::Tensor& old_log_prob, const at::Tensor& advantages,
                         const at::Tensor& advantage_map, double clip_range, double adv_clip_max,
                         double beta, bool simple, at::Tensor& loss, at::Tensor& metrics) {
  args.old_log_prob = old_log_prob.data_ptr();
  args.advantages = advantages.data_ptr();
  args.advantage_map = advantage_map.data_ptr();
  args.map_shared = advantage_map.size(0) == 1;
  args.old_bstride = flow_step::batch_stride(old_log_prob);
  args.map_bstride = flow_step::row_stride(advantage_map);
  args.clip_range = clip_range;
  args.adv_clip_max = adv_clip_max;
  args.beta = beta;
  args.simple = simple;
  args.loss = loss.data_ptr();
  args.metrics = metrics.data_ptr();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_grpo_map_surrogate_cuda(
    at::Tensor& logp, const std::optional<at::Tensor>& ref_sq,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, const at::Tensor& advantage_map, double clip_range,
    double adv_clip_max, double beta, bool simple) {
  const auto [B, P] = flow_step::check_map_surrogate_args(
      logp, ref_sq, kl_weight, old_log_prob, advantages, advantage_map, clip_range, adv_clip_max,
      c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor loss, metrics, grad_ref_sq;
  std::tie(loss, metrics, grad_ref_sq) = flow_step::map_surrogate_outputs(logp);
  cuda::FlowGrpoMapSurrogateArgs args;
  args.acc = logp.scalar_type() == at::kDouble ? cuda::DType::kFloat64 : cuda::DType::kFloat32;
  args.batch = B;
  args.positions = P;
  args.logp = logp.data_ptr();
  args.ref_sq = opt_ptr(ref_sq);
  args.kl_weight = opt_ptr(kl_weight);
  set_map_loss_fields(args, old_log_prob, advantages, advantage_map, clip_range, adv_clip_max,
                      beta, simple, loss, metrics);
  args.grad_ref_sq = grad_ref_sq.data_ptr();
  const at::Tensor workspace =  // alive until the kernels are queued
      cuda_scratch(cuda::flow_grpo_map_surrogate_workspace_bytes(args), logp, &args.workspace);
  C10_CUDA_CHECK(cuda::flow_grpo_map_surrogate(args, at::cuda::getCurrentCUDAStream()));
  return {loss, metrics, grad_ref_sq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_grpo_elem_loss_cuda(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& prev,
    const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, const at::Tensor& advantage_map, double clip_range,
    double adv_clip_max, double beta, bool simple, bool write_grad) {
  const char* op = "flow_grpo_elem_loss";
  // old_log_prob / the map may be bf16 / fp16 beside float32 accumulation: the kernel widens
  // them as it reads (no latent-sized float32 copy)
  const Layout L = flow_step::check_elem_loss_args(v, x, prev, ref, coefs, kl_weight,
                                                   old_log_prob, advantages, advantage_map,
                                                   clip_range, adv_clip_max, c10::DeviceType::CUDA,
                                                   /*reduced_rows_ok=*/true);
  const cuda::DType dtype = kernel_dtype(x.scalar_type(), op);
  const cuda::DType model_dtype = kernel_dtype(v.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor loss, metrics, grad_v;  // grad_v in model_output's dtype
  std::tie(loss, metrics, grad_v) = flow_step::elem_loss_outputs(v, coefs, write_grad);
  cuda::FlowGrpoElemLossArgs args;
  args.dtype = dtype;
  args.model_dtype = model_dtype;
  args.batch = L.B;
  args.channels = L.C;
  args.spatial = L.S;
  args.model_output = v.data_ptr();
  args.sample = x.data_ptr();
  args.prev_sample = prev.data_ptr();
  args.ref_model_output = opt_ptr(ref);
  const flow_step::BatchStrides bs = flow_step::batch_strides(L, v, x, prev, ref);
  args.model_output_bstride = bs.v;
  args.sample_bstride = bs.x;
  args.prev_bstride = bs.prev;
  args.ref_bstride = bs.ref;
  args.coefs = coefs.data_ptr();
  args.kl_weight = opt_ptr(kl_weight);
  set_map_loss_fields(args, old_log_prob, advantages, advantage_map, clip_range, adv_clip_max,
                      beta, simple, loss, metrics);
  args.old_dtype = kernel_dtype(old_log_prob.scalar_type(), op);
  args.map_dtype = kernel_dtype(advantage_map.scalar_type(), op);
  args.grad_v = write_grad ? grad_v.data_ptr() : nullptr;  // without write_grad: [0], unwritten
  const at::Tensor workspace =  // alive until the kernels are queued
      cuda_scratch(cuda::flow_grpo_elem_loss_workspace_bytes(args), v, &args.workspace);
  C10_CUDA_CHECK(cuda::flow_grpo_elem_loss(args, at::cuda::getCurrentCUDAStream()));
  return {loss, metrics, grad_v};
}

}  // namespace
}  // namespace tbk

TORCH_LIBRARY_IMPL(tbkernels, CUDA, m) {
  m.impl("flow_step_forward", &tbk::flow_step_forward_cuda);
  m.impl("flow_step_backward", &tbk::flow_step_backward_cuda);
  m.impl("flow_grpo_surrogate", &tbk::flow_grpo_surrogate_cuda);
  m.impl("flow_grpo_map_surrogate", &tbk::flow_grpo_map_surrogate_cuda);
  m.impl("flow_grpo_elem_loss", &tbk::flow_grpo_elem_loss_cuda);
}
