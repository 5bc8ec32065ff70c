// Op schemas of tbkernels and the tiny Python module `tbkernels._C`.
//
// Schemas are defined once here; each backend registers its kernel for its dispatch key in its
// own file (csrc/cpu/*.cpp for CPU, csrc/cuda/*_cuda.cpp for CUDA). Fake (meta) implementations
// and autograd live in Python next to each op's wrapper (python/tbkernels/ops/).
#include <torch/extension.h>

TORCH_LIBRARY(tbkernels, m) {
  // rewards [B, K] contiguous floating; group_index [B] int64 dense ids in [0, num_groups) or
  // None for contiguous groups of group_size. Returns (adv [B, K] rewards.dtype,
  // mean [G, K], std [G, K] (float64 for float64 rewards, else float32), count [G] int64).
  m.def(
      "group_advantages(Tensor rewards, Tensor? group_index, SymInt group_size, SymInt num_groups, "
      "int std_mode, int ddof, float eps, float clip, bool check_finite) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Flow-matching GRPO step (python/tbkernels/ops/flow_grpo.py). Latents [B, C, (T,) H, W]
  // contiguous, one dtype; coefs [B, 5] = (cx, cv, alpha, gamma, s), float64 for float64 latents
  // else float32; reduction 0 mean -> [B], 1 channel_sum -> [B, (T,) H, W], 2 none -> latent shape.
  // prev_or_noise is the stored prev_sample, or with sampling=True the standard-normal draw.
  // Returns (logp, ref_sq [B] = sum (v - v_ref)^2, mean (or [0]), sampled prev (or [0])).
  m.def(
      "flow_step_forward(Tensor model_output, Tensor sample, Tensor? prev_or_noise, "
      "Tensor? ref_model_output, Tensor coefs, int reduction, bool sampling, bool write_mean) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // grad_v = cv*grad_mean - 2*alpha*cv*grad_logp*(prev - mean) + 2*grad_ref_sq*(v - v_ref).
  m.def(
      "flow_step_backward(Tensor model_output, Tensor sample, Tensor? prev_sample, "
      "Tensor? ref_model_output, Tensor coefs, int reduction, Tensor? grad_logp, "
      "Tensor? grad_mean, Tensor? grad_ref_sq) -> Tensor");
  // flow_grpo_loss's per-sample clipped surrogate (csrc/flow_grpo_surrogate.h), on [B] tensors of
  // one accumulation dtype: logp, ref_sq and kl_weight (kl = ref_sq * kl_weight; both or neither),
  // old_log_prob, advantages. Returns (loss [], metrics [4] = (approx_kl, clipfrac, kl,
  // ratio_mean), factors [2, B] = d loss / d logp and d loss / d ref_sq).
  m.def(
      "flow_grpo_surrogate(Tensor logp, Tensor? ref_sq, Tensor? kl_weight, Tensor old_log_prob, "
      "Tensor advantages, float clip_range, float adv_clip_max, float beta, bool simple) "
      "-> (Tensor, Tensor, Tensor)");
  // The same surrogate with a ViPO advantage map: one policy term per position, with the
  // advantage advantages[b] * advantage_map[b, p]. logp, old_log_prob [B, P] and advantage_map
  // ([B, P], or [1, P] shared by the batch) contiguous in one accumulation dtype; advantages,
  // ref_sq, kl_weight [B]. logp is overwritten with d loss / d logp (the step's log-prob buffer
  // becomes its backward's input, no second buffer). Returns (loss [], metrics [4],
  // grad_ref_sq [B] = d loss / d ref_sq).
  m.def(
      "flow_grpo_map_surrogate(Tensor(a!) logp, Tensor? ref_sq, Tensor? kl_weight, "
      "Tensor old_log_prob, Tensor advantages, Tensor advantage_map, float clip_range, "
      "float adv_clip_max, float beta, bool simple) -> (Tensor, Tensor, Tensor)");
  // flow_grpo_loss with a per-element ViPO map, the step and the surrogate in one pass: per
  // element, logp = alpha d^2 + gamma (d = prev - cx x - cv v) and its policy term with the
  // advantage advantages[b] * advantage_map[b, e]; the KL from sum (v - v_ref)^2. Latents as
  // flow_step_forward (prev_sample required); old_log_prob [B, N] and advantage_map ([B, N], or
  // [1, N] shared by the batch), N = C*S, and advantages, kl_weight [B], contiguous in the
  // accumulation dtype. With write_grad the same pass writes grad_v = d loss / d model_output of
  // a unit loss (every gradient term is elementwise), so no log-prob buffer exists at all.
  // Returns (loss [], metrics [4], grad_v like model_output, or [0] without write_grad).
  m.def(
      "flow_grpo_elem_loss(Tensor model_output, Tensor sample, Tensor prev_sample, "
      "Tensor? ref_model_output, Tensor coefs, Tensor? kl_weight, Tensor old_log_prob, "
      "Tensor advantages, Tensor advantage_map, float clip_range, float adv_clip_max, "
      "float beta, bool simple, bool write_grad) -> (Tensor, Tensor, Tensor)");
}

namespace {
bool built_with_cuda() {
#ifdef TBK_WITH_CUDA
  return true;
#else
  return false;
#endif
}
bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tbkernels compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("built_with_openmp", &built_with_openmp,
        "True when the C++ CPU kernels were compiled with OpenMP (at::parallel_for uses threads)");
}
