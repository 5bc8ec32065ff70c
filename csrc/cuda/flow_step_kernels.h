// Flow-matching GRPO step, CUDA kernels: plain C++ API over raw device pointers.
//
// Contract and math: csrc/ops.cpp (schemas), csrc/cpu/flow_step.cpp (the CPU kernels this
// reproduces), python/tbkernels/ops/flow_grpo.py. This header and its .cu include no torch
// header, so the kernels build with plain `nvcc -c`; the torch binding is flow_step_cuda.cpp.
//
// Latents are [B, C, S] (S = product of the dims after C, N = C*S). Element types: `dtype` is
// the latents' (sample, prev_or_noise / prev_sample, grad_mean, mean_out, prev_out), `model_dtype`
// model_output's (and ref_model_output's and grad_v's; kSameDType, the default: `dtype`). Allowed:
// one type for all (float32, float64, float16, bfloat16), or a bfloat16 / float16 model output
// beside float32 latents (Flow-GRPO: trajectory latents in float32, the transformer's velocity in
// bfloat16); any other pair is cudaErrorInvalidValue (workspace 0, num_launches -1). Every loaded
// value is converted to the accumulation type first, so a mixed run's results equal, bit for bit,
// those of the run on model_output (and ref_model_output) converted to float32 beforehand, grad_v
// then rounded to model_dtype (round to nearest even). Each
// latent input has its own batch stride (its *_bstride field): element e < N of sample b is read
// at ptr + b*bstride + e. Every sample is contiguous, but consecutive samples may lie any
// bstride >= 0 elements apart, so Flow-GRPO's trajectory slices (latents[:, j] of a
// [B, steps, C, ...] tensor: bstride steps*N) and batch-expanded tensors (bstride 0) are read in
// place instead of copied. -1 (the default) means contiguous, bstride N; below -1 is rejected.
// Every latent output is contiguous [B, C, S]. Per sample b and element e, with
// coefs[b] = (cx, cv, alpha, gamma, s):
//   mean_e = cx x_e + cv v_e,   d_e = prev_e - mean_e,   logp_e = alpha d_e^2 + gamma
// Accumulation (and coefs, logp, ref_sq, grad_logp, grad_ref_sq) is double for kFloat64 latents
// and float for the others ("Acc" below: that of `dtype`).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "group_advantages_kernels.h"  // tbk::cuda::DType (shared element-type enum)

namespace tbk {
namespace cuda {

// model_dtype's default: the same as `dtype` (the latents').
constexpr DType kSameDType = static_cast<DType>(-1);

enum FlowReduction : int {
  kFlowReduceMean = 0,        // logp [B]: mean over the C*S elements
  kFlowReduceChannelSum = 1,  // logp [B, S]: sum over channels
  kFlowReduceNone = 2,        // logp [B, C, S]
};

struct FlowStepForwardArgs {
  DType dtype = DType::kFloat32;  // element type of the latents (all but the model-typed ones)
  DType model_dtype = kSameDType; // of model_output and ref_model_output (see the top)
  int64_t batch = 0;              // B
  int64_t channels = 0;           // C
  int64_t spatial = 0;            // S

  // Inputs (device memory, [B, C, S] with the batch strides below unless noted; model_output and
  // ref_model_output of model_dtype, the others of `dtype`).
  const void* model_output = nullptr;  // v
  const void* sample = nullptr;        // x
  // sampling: standard-normal noise (nullptr: prev = mean); otherwise the stored prev_sample
  // (nullptr: prev = mean, d = 0).
  const void* prev_or_noise = nullptr;
  const void* ref_model_output = nullptr;  // v_ref; nullptr: ref_sq = 0
  // Batch strides in elements of model_output, sample, prev_or_noise, ref_model_output (see the
  // top of this file; -1: contiguous).
  int64_t model_output_bstride = -1, sample_bstride = -1, prev_bstride = -1, ref_bstride = -1;
  const void* coefs = nullptr;             // [B, 5] Acc
  int reduction = kFlowReduceMean;         // FlowReduction
  bool sampling = false;

  // Outputs (device memory).
  void* logp = nullptr;      // Acc, shaped by `reduction`
  void* ref_sq = nullptr;    // [B] Acc, sum_e (v_e - vref_e)^2 (0 without a reference)
  void* mean_out = nullptr;  // optional [B, C, S] `dtype`: the transition mean
  // [B, C, S] `dtype`, required when sampling: prev = mean + s*noise rounded to `dtype`; that
  // rounded value is the one whose log-prob is computed.
  void* prev_out = nullptr;

  // Scratch of flow_step_forward_workspace_bytes(args) bytes (any contents, 256-byte aligned;
  // may be nullptr when that is 0). Holds the per-block partial sums; each sample's total is
  // combined from them in a fixed order, so results are bitwise deterministic.
  void* workspace = nullptr;
};

struct FlowStepBackwardArgs {
  DType dtype = DType::kFloat32;   // of sample, prev_sample, grad_mean
  DType model_dtype = kSameDType;  // of model_output, ref_model_output, grad_v (see the top)
  int64_t batch = 0, channels = 0, spatial = 0;  // B, C, S

  const void* model_output = nullptr;      // v
  const void* sample = nullptr;            // x
  const void* prev_sample = nullptr;       // nullptr: prev = mean
  const void* ref_model_output = nullptr;  // needed for the grad_ref_sq term
  const void* coefs = nullptr;             // [B, 5] Acc
  int reduction = kFlowReduceMean;         // shape of grad_logp
  const void* grad_logp = nullptr;         // Acc, shaped like logp; nullptr: no log-prob term
  const void* grad_mean = nullptr;         // [B, C, S] `dtype`; nullptr: no mean term
  const void* grad_ref_sq = nullptr;       // [B] Acc; nullptr (or no reference): no KL term
  // Batch strides in elements of the latent inputs above (see the top of this file; -1:
  // contiguous); grad_logp and grad_ref_sq are contiguous.
  int64_t model_output_bstride = -1, sample_bstride = -1, prev_bstride = -1, ref_bstride = -1;
  int64_t grad_mean_bstride = -1;

  void* grad_v = nullptr;  // [B, C, S] model_dtype, always fully written
};

// flow_grpo_loss's per-sample surrogate (formula: csrc/flow_grpo_surrogate.h). Every [B] tensor
// is contiguous device memory of the accumulation type `acc` (kFloat32 or kFloat64).
struct FlowGrpoSurrogateArgs {
  DType acc = DType::kFloat32;
  int64_t batch = 0;                   // B
  const void* logp = nullptr;          // [B]
  const void* ref_sq = nullptr;        // [B], with kl_weight; both nullptr: no reference
  const void* kl_weight = nullptr;     // [B]
  const void* old_log_prob = nullptr;  // [B]
  const void* advantages = nullptr;    // [B]
  double clip_range = 1e-4, adv_clip_max = 5.0, beta = 0.0;
  bool simple = false;                 // vipo_form "simple": -A log pi
  void* loss = nullptr;     // [] the loss
  void* metrics = nullptr;  // [4] approx_kl, clipfrac, kl, ratio_mean
  void* factors = nullptr;  // [2, B] d loss / d logp, d loss / d ref_sq
};

// flow_grpo_loss's surrogate with a ViPO map (formula: csrc/flow_grpo_surrogate.h, one policy
// term per position). Device memory of `acc`; [B] tensors and logp contiguous, old_log_prob and
// advantage_map row-strided (see the row strides below).
//
// Row strides (here and in FlowGrpoElemLossArgs): row b of old_log_prob / advantage_map is read
// at ptr + b*row_stride, each row contiguous, so the per-step slices [:, j] of log-probs or maps
// stored for a whole trajectory ([B, steps, n]: row stride steps*n) and expanded rows (row stride
// 0) are read in place. -1 (the default) means contiguous (row stride n); any value >= 0 is used
// as given; below -1, or a last row past int64 offsets, is rejected (cudaErrorInvalidValue,
// workspace 0, num_launches -1). map_shared means a single row shared by the batch (row stride
// 0), and map_bstride is then ignored.
struct FlowGrpoMapSurrogateArgs {
  DType acc = DType::kFloat32;
  int64_t batch = 0, positions = 0;    // B, P
  void* logp = nullptr;                // [B, P] contiguous; overwritten with d loss / d logp
  const void* ref_sq = nullptr;        // [B], with kl_weight; both nullptr: no reference
  const void* kl_weight = nullptr;     // [B]
  const void* old_log_prob = nullptr;  // [B, P], rows old_bstride apart
  const void* advantages = nullptr;    // [B]
  const void* advantage_map = nullptr; // [B, P] (rows map_bstride apart), or [1, P] with map_shared
  bool map_shared = false;
  // Row strides in elements of old_log_prob and advantage_map (see above; -1: contiguous, P).
  int64_t old_bstride = -1, map_bstride = -1;
  double clip_range = 1e-4, adv_clip_max = 5.0, beta = 0.0;
  bool simple = false;
  void* loss = nullptr;         // []
  void* metrics = nullptr;      // [4] approx_kl, clipfrac, kl, ratio_mean
  void* grad_ref_sq = nullptr;  // [B] d loss / d ref_sq
  void* workspace = nullptr;    // flow_grpo_map_surrogate_workspace_bytes(args) bytes
};

// FlowGrpoElemLossArgs::old_dtype / map_dtype's default: the accumulation type (float, double
// for float64 latents).
constexpr DType kAccDType = static_cast<DType>(-1);

// flow_grpo_loss with a per-element ViPO map, the step and the surrogate fused
// (flow_grpo_elem_loss; formula: csrc/ops.cpp, csrc/flow_grpo_surrogate.h). Latents as
// FlowStepForwardArgs with a stored prev_sample (batch strides included); [B, N] (N = C*S) and
// [B] tensors device memory of the accumulation type, contiguous but for old_log_prob and
// advantage_map, which are row-strided as in FlowGrpoMapSurrogateArgs and, with float
// accumulation, may each also be bfloat16 or float16 (old_dtype / map_dtype; read as stored and
// widened exactly, so results equal those of float32 copies bit for bit: no latent-sized copy).
struct FlowGrpoElemLossArgs {
  DType dtype = DType::kFloat32;                 // of sample and prev_sample
  DType model_dtype = kSameDType;                // of model_output, ref, grad_v (see the top)
  int64_t batch = 0, channels = 0, spatial = 0;  // B, C, S
  const void* model_output = nullptr;            // v
  const void* sample = nullptr;                  // x
  const void* prev_sample = nullptr;             // required
  const void* ref_model_output = nullptr;        // v_ref, needed when kl_weight is given
  // Batch strides in elements of the four latent inputs (see the top of this file; -1:
  // contiguous).
  int64_t model_output_bstride = -1, sample_bstride = -1, prev_bstride = -1, ref_bstride = -1;
  const void* coefs = nullptr;                   // [B, 5] Acc
  const void* kl_weight = nullptr;               // [B]; nullptr: no reference
  const void* old_log_prob = nullptr;            // [B, N], rows old_bstride apart
  const void* advantages = nullptr;              // [B]
  const void* advantage_map = nullptr;           // [B, N] (rows map_bstride apart), or [1, N]
  bool map_shared = false;                       // with map_shared
  // Row strides in elements of old_log_prob and advantage_map (see FlowGrpoMapSurrogateArgs; -1:
  // contiguous, N; map_bstride ignored with map_shared).
  int64_t old_bstride = -1, map_bstride = -1;
  // Element types of old_log_prob and advantage_map: kAccDType or the accumulation type itself;
  // with float accumulation also kBFloat16 or kFloat16. Anything else: cudaErrorInvalidValue
  // (workspace 0, num_launches -1).
  DType old_dtype = kAccDType, map_dtype = kAccDType;
  double clip_range = 1e-4, adv_clip_max = 5.0, beta = 0.0;
  bool simple = false;
  void* loss = nullptr;       // []
  void* metrics = nullptr;    // [4] approx_kl, clipfrac, kl, ratio_mean
  void* grad_v = nullptr;     // [B, C, S] model_dtype, d loss / d v of a unit loss; nullptr: none
  void* workspace = nullptr;  // flow_grpo_elem_loss_workspace_bytes(args) bytes
};

// Bytes of scratch `flow_step_forward` needs (pointers are ignored, only sizes and modes count).
// Returns 0 for inconsistent arguments (flow_step_forward then reports cudaErrorInvalidValue).
size_t flow_step_forward_workspace_bytes(const FlowStepForwardArgs& args);

// Kernel launches flow_step_forward will issue (0 for B == 0, -1 for inconsistent arguments),
// and the number of blocks of its main pass. For tests and benchmarks of the launch structure.
int flow_step_forward_num_launches(const FlowStepForwardArgs& args);
int64_t flow_step_forward_num_blocks(const FlowStepForwardArgs& args);

// Enqueue on `stream`; return the first launch error, or cudaErrorInvalidValue for inconsistent
// arguments (negative sizes, a batch stride below -1 or past int64 offsets, unknown
// dtype/reduction, a dtype pair other than those allowed (see the top), a missing required
// pointer).
// Forward: main pass + per-sample finalize (2 launches). Backward: 1 elementwise launch, no
// workspace.
cudaError_t flow_step_forward(const FlowStepForwardArgs& args, cudaStream_t stream);
cudaError_t flow_step_backward(const FlowStepBackwardArgs& args, cudaStream_t stream);
// One launch of a single warp (B is a batch of samples; the warp strides over it). No workspace.
cudaError_t flow_grpo_surrogate(const FlowGrpoSurrogateArgs& args, cudaStream_t stream);
// Two launches (the main pass over [B, P], skipped when B*P == 0, and a one-block finalize);
// workspace 32 bytes per main-pass block. workspace_bytes is 0 and num_launches -1 for
// inconsistent sizes or row strides.
size_t flow_grpo_map_surrogate_workspace_bytes(const FlowGrpoMapSurrogateArgs& args);
int flow_grpo_map_surrogate_num_launches(const FlowGrpoMapSurrogateArgs& args);
cudaError_t flow_grpo_map_surrogate(const FlowGrpoMapSurrogateArgs& args, cudaStream_t stream);
// Two launches (the main pass over the latents, skipped when B*C*S == 0, and a one-block
// finalize); workspace 40 bytes per main-pass block. workspace_bytes is 0 and num_launches -1
// for inconsistent sizes, strides or dtypes.
size_t flow_grpo_elem_loss_workspace_bytes(const FlowGrpoElemLossArgs& args);
int flow_grpo_elem_loss_num_launches(const FlowGrpoElemLossArgs& args);
cudaError_t flow_grpo_elem_loss(const FlowGrpoElemLossArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tbk
