// C entry points into the emulated CUDA kernels, for tests/test_cuda_emulated.py (ctypes).
// Each fills the kernel's argument struct from plain pointers (host memory stands in for device
// memory under the emulator), gives it a workspace filled with garbage (as the caching allocator
// would), launches, and returns the cudaError_t. The flow-step entry points take the latent
// inputs' batch strides as a trailing array (nullptr: every input contiguous), in the order of
// their latent pointer arguments; the map losses' also the row strides of old_log_prob and
// advantage_map (the elem loss at the end of that array, the map surrogate in its own). Their
// second argument is the model dtype (model_output's, ref's, grad_v's; -1: the latent dtype).
// The elem loss also takes the dtypes of old_log_prob and advantage_map after map_shared (-1:
// the accumulation type).
#include <cstdint>
#include <vector>

#include "emu.h"
#include "flow_step_kernels.h"
#include "group_advantages_kernels.h"
#include "per_sample_mse_kernels.h"

namespace {
struct Workspace {
  std::vector<unsigned char> bytes;
  void* aligned(size_t n) {
    if (n == 0) return nullptr;
    bytes.assign(n + 256, 0xAB);
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(bytes.data()) + 255) &
                                   ~static_cast<uintptr_t>(255));
  }
};
}  // namespace

extern "C" {

long long emu_ops() { return ::emu::g_ops; }

int emu_group_advantages(const void* rewards, int dtype, int64_t B, int64_t K,
                         const int64_t* group_index, int64_t S, int64_t G, int mode, int ddof,
                         double eps, double clip, void* adv, void* mean, void* std_out,
                         int64_t* count, int64_t* first_bad, int* launches) {
  tbk::cuda::GroupAdvantagesArgs a;
  a.rewards = rewards; a.dtype = static_cast<tbk::cuda::DType>(dtype); a.batch = B; a.heads = K;
  a.group_index = group_index; a.group_size = S; a.num_groups = G; a.std_mode = mode;
  a.ddof = ddof; a.eps = eps; a.clip = clip; a.adv = adv; a.mean = mean; a.std_out = std_out;
  a.count = count; a.first_bad = first_bad;
  Workspace ws;
  a.workspace = ws.aligned(tbk::cuda::group_advantages_workspace_bytes(a));
  *launches = tbk::cuda::group_advantages_num_launches(a);
  return static_cast<int>(tbk::cuda::group_advantages(a, nullptr));
}

// bstrides: {v, x, prev_or_noise, ref}, or nullptr.
int emu_flow_step_forward(int dtype, int model_dtype, int64_t B, int64_t C, int64_t S,
                          const void* v, const void* x, const void* prev_or_noise,
                          const void* ref, const void* coefs, int reduction, int sampling,
                          void* logp, void* ref_sq, void* mean_out, void* prev_out,
                          int* launches, const int64_t* bstrides) {
  tbk::cuda::FlowStepForwardArgs a;
  a.dtype = static_cast<tbk::cuda::DType>(dtype); a.batch = B; a.channels = C; a.spatial = S;
  a.model_dtype = static_cast<tbk::cuda::DType>(model_dtype);
  a.model_output = v; a.sample = x; a.prev_or_noise = prev_or_noise; a.ref_model_output = ref;
  if (bstrides != nullptr) {
    a.model_output_bstride = bstrides[0]; a.sample_bstride = bstrides[1];
    a.prev_bstride = bstrides[2]; a.ref_bstride = bstrides[3];
  }
  a.coefs = coefs; a.reduction = reduction; a.sampling = sampling != 0; a.logp = logp;
  a.ref_sq = ref_sq; a.mean_out = mean_out; a.prev_out = prev_out;
  Workspace ws;
  a.workspace = ws.aligned(tbk::cuda::flow_step_forward_workspace_bytes(a));
  *launches = tbk::cuda::flow_step_forward_num_launches(a);
  return static_cast<int>(tbk::cuda::flow_step_forward(a, nullptr));
}

// bstrides: {v, x, prev, ref, grad_mean}, or nullptr.
int emu_flow_step_backward(int dtype, int model_dtype, int64_t B, int64_t C, int64_t S,
                           const void* v, const void* x, const void* prev, const void* ref,
                           const void* coefs, int reduction, const void* grad_logp,
                           const void* grad_mean, const void* grad_ref_sq, void* grad_v,
                           const int64_t* bstrides) {
  tbk::cuda::FlowStepBackwardArgs a;
  a.dtype = static_cast<tbk::cuda::DType>(dtype); a.batch = B; a.channels = C; a.spatial = S;
  a.model_dtype = static_cast<tbk::cuda::DType>(model_dtype);
  a.model_output = v; a.sample = x; a.prev_sample = prev; a.ref_model_output = ref;
  a.coefs = coefs; a.reduction = reduction; a.grad_logp = grad_logp; a.grad_mean = grad_mean;
  a.grad_ref_sq = grad_ref_sq; a.grad_v = grad_v;
  if (bstrides != nullptr) {
    a.model_output_bstride = bstrides[0]; a.sample_bstride = bstrides[1];
    a.prev_bstride = bstrides[2]; a.ref_bstride = bstrides[3]; a.grad_mean_bstride = bstrides[4];
  }
  return static_cast<int>(tbk::cuda::flow_step_backward(a, nullptr));
}

int emu_flow_grpo_surrogate(int acc_dtype, int64_t B, const void* logp, const void* ref_sq,
                            const void* kl_weight, const void* old_log_prob,
                            const void* advantages, double clip_range, double adv_clip_max,
                            double beta, int simple, void* loss, void* metrics, void* factors) {
  tbk::cuda::FlowGrpoSurrogateArgs a;
  a.acc = static_cast<tbk::cuda::DType>(acc_dtype); a.batch = B; a.logp = logp;
  a.ref_sq = ref_sq; a.kl_weight = kl_weight; a.old_log_prob = old_log_prob;
  a.advantages = advantages; a.clip_range = clip_range; a.adv_clip_max = adv_clip_max;
  a.beta = beta; a.simple = simple != 0; a.loss = loss; a.metrics = metrics; a.factors = factors;
  return static_cast<int>(tbk::cuda::flow_grpo_surrogate(a, nullptr));
}

// row_strides: {old_log_prob, advantage_map}, or nullptr.
int emu_flow_grpo_map_surrogate(int acc_dtype, int64_t B, int64_t P, void* logp,
                                const void* ref_sq, const void* kl_weight,
                                const void* old_log_prob, const void* advantages,
                                const void* advantage_map, int map_shared, double clip_range,
                                double adv_clip_max, double beta, int simple, void* loss,
                                void* metrics, void* grad_ref_sq, int* launches,
                                const int64_t* row_strides) {
  tbk::cuda::FlowGrpoMapSurrogateArgs a;
  a.acc = static_cast<tbk::cuda::DType>(acc_dtype); a.batch = B; a.positions = P; a.logp = logp;
  a.ref_sq = ref_sq; a.kl_weight = kl_weight; a.old_log_prob = old_log_prob;
  a.advantages = advantages; a.advantage_map = advantage_map; a.map_shared = map_shared != 0;
  a.clip_range = clip_range; a.adv_clip_max = adv_clip_max; a.beta = beta;
  a.simple = simple != 0; a.loss = loss; a.metrics = metrics; a.grad_ref_sq = grad_ref_sq;
  if (row_strides != nullptr) {
    a.old_bstride = row_strides[0]; a.map_bstride = row_strides[1];
  }
  Workspace ws;
  a.workspace = ws.aligned(tbk::cuda::flow_grpo_map_surrogate_workspace_bytes(a));
  *launches = tbk::cuda::flow_grpo_map_surrogate_num_launches(a);
  return static_cast<int>(tbk::cuda::flow_grpo_map_surrogate(a, nullptr));
}

// bstrides: {v, x, prev, ref, old_log_prob, advantage_map}, or nullptr.
int emu_flow_grpo_elem_loss(int dtype, int model_dtype, int64_t B, int64_t C, int64_t S,
                            const void* v, const void* x, const void* prev, const void* ref,
                            const void* coefs, const void* kl_weight, const void* old_log_prob,
                            const void* advantages, const void* advantage_map, int map_shared,
                            int old_dtype, int map_dtype, double clip_range, double adv_clip_max,
                            double beta, int simple, void* loss, void* metrics, void* grad_v,
                            int* launches, int64_t* workspace_bytes, const int64_t* bstrides) {
  tbk::cuda::FlowGrpoElemLossArgs a;
  a.dtype = static_cast<tbk::cuda::DType>(dtype); a.batch = B; a.channels = C; a.spatial = S;
  a.model_dtype = static_cast<tbk::cuda::DType>(model_dtype);
  a.model_output = v; a.sample = x; a.prev_sample = prev; a.ref_model_output = ref;
  if (bstrides != nullptr) {
    a.model_output_bstride = bstrides[0]; a.sample_bstride = bstrides[1];
    a.prev_bstride = bstrides[2]; a.ref_bstride = bstrides[3];
    a.old_bstride = bstrides[4]; a.map_bstride = bstrides[5];
  }
  a.coefs = coefs; a.kl_weight = kl_weight; a.old_log_prob = old_log_prob;
  a.advantages = advantages; a.advantage_map = advantage_map; a.map_shared = map_shared != 0;
  a.old_dtype = static_cast<tbk::cuda::DType>(old_dtype);
  a.map_dtype = static_cast<tbk::cuda::DType>(map_dtype);
  a.clip_range = clip_range; a.adv_clip_max = adv_clip_max; a.beta = beta;
  a.simple = simple != 0; a.loss = loss; a.metrics = metrics; a.grad_v = grad_v;
  Workspace ws;
  const size_t bytes = tbk::cuda::flow_grpo_elem_loss_workspace_bytes(a);
  a.workspace = ws.aligned(bytes);
  *launches = tbk::cuda::flow_grpo_elem_loss_num_launches(a);
  *workspace_bytes = static_cast<int64_t>(bytes);
  return static_cast<int>(tbk::cuda::flow_grpo_elem_loss(a, nullptr));
}

int emu_per_sample_mse_forward(int pred_dtype, int target_dtype, int64_t B, int64_t D,
                               const void* pred, const void* target, void* out, int* launches) {
  tbk::cuda::PerSampleMseForwardArgs a;
  a.pred_dtype = static_cast<tbk::cuda::DType>(pred_dtype);
  a.target_dtype = static_cast<tbk::cuda::DType>(target_dtype);
  a.batch = B; a.per_sample = D; a.pred = pred; a.target = target; a.out = out;
  Workspace ws;
  a.workspace = ws.aligned(tbk::cuda::per_sample_mse_forward_workspace_bytes(a));
  *launches = tbk::cuda::per_sample_mse_forward_num_launches(a);
  return static_cast<int>(tbk::cuda::per_sample_mse_forward(a, nullptr));
}

int emu_per_sample_mse_backward(int pred_dtype, int target_dtype, int64_t B, int64_t D,
                                const void* grad_out, const void* pred, const void* target,
                                void* grad_pred) {
  tbk::cuda::PerSampleMseBackwardArgs a;
  a.pred_dtype = static_cast<tbk::cuda::DType>(pred_dtype);
  a.target_dtype = static_cast<tbk::cuda::DType>(target_dtype);
  a.batch = B; a.per_sample = D; a.grad_out = grad_out; a.pred = pred; a.target = target;
  a.grad_pred = grad_pred;
  return static_cast<int>(tbk::cuda::per_sample_mse_backward(a, nullptr));
}

}  // extern "C"
