// Argument checks and output shapes of the flow-step ops, shared by the CPU kernels
// (csrc/cpu/flow_step.cpp) and the CUDA binding (csrc/cuda/flow_step_cuda.cpp), so both backends
// reject the same inputs with the same messages. Schema: csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace tbk {
namespace flow_step {

constexpr int64_t kReduceMean = 0, kReduceChannelSum = 1, kReduceNone = 2;

// A latent [B, C, (T,) H, W] seen as [B, C, S], S the product of the dims after C.
struct Layout {
  int64_t B, C, S;
};

// The accumulation (and coefs / logp) dtype of a latent dtype.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The batch stride of a latent input: elements between sample b and sample b + 1, when every
// sample t[b] is itself contiguous (the strides of dims 1.. those of a contiguous [C, (T,) H, W],
// size-1 dims ignored); -1 for any other layout. Any batch stride >= 0 is accepted, so the
// trajectory slices Flow-GRPO passes (latents[:, j] of a [B, steps, C, T, H, W] tensor) and
// batch-expanded tensors are read in place instead of copied. The kernels read element e of
// sample b at data_ptr + b * batch_stride + e; every output stays contiguous.
inline int64_t batch_stride(const at::Tensor& t) {
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) expect *= t.size(d);
  const int64_t per_sample = expect;
  if (t.numel() == 0) return per_sample;
  expect = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expect) return -1;
    expect *= t.size(d);
  }
  return t.size(0) == 1 ? per_sample : t.stride(0);
}

// The dtype pairs the latent ops take: model_output's (also the reference's and grad_v's) and the
// latents' (sample, prev_sample or noise, grad_mean, the mean and sampled outputs) equal, or a
// bfloat16 / float16 model output beside float32 latents: Flow-GRPO's own pairing (a bf16
// transformer, a float32 trajectory), computed in float32 without converting model_output.
inline bool dtypes_supported(at::ScalarType model, at::ScalarType latent) {
  return model == latent ||
         (latent == at::kFloat && (model == at::kBFloat16 || model == at::kHalf));
}

// model_output and sample: same shape, a supported dtype pair, each sample contiguous (any batch
// stride), on a device of `device_type`.
inline Layout check_latents(const at::Tensor& v, const at::Tensor& x, const char* op,
                            c10::DeviceType device_type) {
  TORCH_CHECK(v.dim() >= 3, op, ": model_output must be [B, C, (T,) H, W], got ", v.sizes());
  TORCH_CHECK(x.sizes() == v.sizes(), op, ": sample ", x.sizes(), " must match model_output ",
              v.sizes());
  TORCH_CHECK(dtypes_supported(v.scalar_type(), x.scalar_type()), op, ": sample (",
              x.scalar_type(), ") must have model_output's dtype (", v.scalar_type(),
              "), or be float32 beside a bfloat16 or float16 model_output");
  TORCH_CHECK(batch_stride(v) >= 0 && batch_stride(x) >= 0, op,
              ": each sample of the latents must be contiguous (a batch stride is allowed), got "
              "model_output strides ", v.strides(), " and sample strides ", x.strides());
  TORCH_CHECK(v.device().type() == device_type, op, " (", c10::DeviceTypeName(device_type, true),
              "): tensors must be on a ", c10::DeviceTypeName(device_type), " device, got ",
              v.device());
  TORCH_CHECK(x.device() == v.device(), op, ": sample must be on model_output's device ",
              v.device(), ", got ", x.device());
  int64_t S = 1;
  for (int64_t d = 2; d < v.dim(); ++d) S *= v.size(d);
  return {v.size(0), v.size(1), S};
}

// An optional latent-sized input of `like`'s shape, dtype and device, each sample contiguous:
// like = sample for prev_sample, noise and grad_mean, model_output for ref_model_output.
inline void check_like(const std::optional<at::Tensor>& t, const at::Tensor& like,
                       const char* like_name, const char* what, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == like.sizes() && t->scalar_type() == like.scalar_type() &&
                  batch_stride(*t) >= 0 && t->device() == like.device(),
              op, ": ", what, " must be a tensor like ", like_name, " ", like.sizes(), " ",
              like.scalar_type(), " with each sample contiguous, got ", t->sizes(), " ",
              t->scalar_type(), " strides ", t->strides());
}

// A latent-sized output (mean, sampled prev, grad_v): always contiguous, whatever model_output's
// batch stride (empty_like would keep a dense input's strides).
inline at::Tensor latent_output(const at::Tensor& v) { return at::empty(v.sizes(), v.options()); }

// The batch strides of the latent inputs (see batch_stride); C*S for an absent one.
struct BatchStrides {
  int64_t v, x, prev, ref, grad_mean;
};

inline int64_t opt_batch_stride(const std::optional<at::Tensor>& t, const Layout& L) {
  return t.has_value() ? batch_stride(*t) : L.C * L.S;
}

inline BatchStrides batch_strides(const Layout& L, const at::Tensor& v, const at::Tensor& x,
                                  const std::optional<at::Tensor>& prev,
                                  const std::optional<at::Tensor>& ref,
                                  const std::optional<at::Tensor>& grad_mean = std::nullopt) {
  return {batch_stride(v), batch_stride(x), opt_batch_stride(prev, L), opt_batch_stride(ref, L),
          opt_batch_stride(grad_mean, L)};
}

inline void check_coefs(const at::Tensor& coefs, const at::Tensor& v, const char* op) {
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == v.size(0) && coefs.size(1) == 5 &&
                  coefs.is_contiguous() && coefs.scalar_type() == acc_type(v.scalar_type()),
              op, ": coefs must be a contiguous [B, 5] ", acc_type(v.scalar_type()),
              " tensor, got ", coefs.sizes(), " ", coefs.scalar_type());
  TORCH_CHECK(coefs.device() == v.device(), op, ": coefs must be on the latents' device");
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction >= kReduceMean && reduction <= kReduceNone, op,
              ": reduction must be 0, 1 or 2");
}

// logp's shape: [B] (mean), [B, (T,) H, W] (channel_sum), the latent's shape (none).
inline std::vector<int64_t> logp_shape(const at::Tensor& v, int64_t reduction) {
  if (reduction == kReduceMean) return {v.size(0)};
  std::vector<int64_t> shape(v.sizes().begin(), v.sizes().end());
  if (reduction == kReduceChannelSum) shape.erase(shape.begin() + 1);
  return shape;
}

// The backward's incoming gradients: grad_logp shaped like logp, grad_ref_sq [B], both in the
// accumulation dtype, contiguous, on the latents' device; grad_ref_sq needs the reference.
inline void check_backward_grads(const at::Tensor& v, const std::optional<at::Tensor>& ref,
                                 int64_t reduction, const std::optional<at::Tensor>& grad_logp,
                                 const std::optional<at::Tensor>& grad_ref_sq, const char* op) {
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
    TORCH_CHECK(grad_ref_sq->numel() == v.size(0) && grad_ref_sq->is_contiguous() &&
                    grad_ref_sq->scalar_type() == acc,
                op, ": grad_ref_sq must be a contiguous [B] ", acc, " tensor");
    TORCH_CHECK(grad_ref_sq->device() == v.device(), op,
                ": grad_ref_sq must be on the latents' device");
  }
}

// Every check of flow_step_forward's arguments, in the order both backends ran them.
inline Layout check_forward_args(const at::Tensor& v, const at::Tensor& x,
                                 const std::optional<at::Tensor>& prev_or_noise,
                                 const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
                                 int64_t reduction, bool sampling, c10::DeviceType device_type) {
  const char* op = "flow_step_forward";
  const Layout L = check_latents(v, x, op, device_type);
  check_like(prev_or_noise, x, "sample", sampling ? "noise" : "prev_sample", op);
  check_like(ref, v, "model_output", "ref_model_output", op);
  check_coefs(coefs, v, op);
  check_reduction(reduction, op);
  return L;
}

// Every check of flow_step_backward's arguments.
inline Layout check_backward_args(const at::Tensor& v, const at::Tensor& x,
                                  const std::optional<at::Tensor>& prev,
                                  const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
                                  int64_t reduction, const std::optional<at::Tensor>& grad_logp,
                                  const std::optional<at::Tensor>& grad_mean,
                                  const std::optional<at::Tensor>& grad_ref_sq,
                                  c10::DeviceType device_type) {
  const char* op = "flow_step_backward";
  const Layout L = check_latents(v, x, op, device_type);
  check_like(prev, x, "sample", "prev_sample", op);
  check_like(ref, v, "model_output", "ref_model_output", op);
  check_like(grad_mean, x, "sample", "grad_mean", op);
  check_coefs(coefs, v, op);
  check_reduction(reduction, op);
  check_backward_grads(v, ref, reduction, grad_logp, grad_ref_sq, op);
  return L;
}

// What both surrogates require of their log-prob (`dims`-D, float32 or float64, on a
// `device_type` device) and of the optional reference pair.
inline void check_surrogate_logp(const char* op, const at::Tensor& logp, int64_t dims,
                                 const char* shape_name, const std::optional<at::Tensor>& ref_sq,
                                 const std::optional<at::Tensor>& kl_weight,
                                 c10::DeviceType device_type) {
  TORCH_CHECK(logp.dim() == dims, op, ": logp must be a ", shape_name, " tensor, got ",
              logp.sizes());
  TORCH_CHECK(logp.scalar_type() == at::kFloat || logp.scalar_type() == at::kDouble, op,
              ": logp must be float32 or float64, got ", logp.scalar_type());
  TORCH_CHECK(logp.device().type() == device_type, op, " (", c10::DeviceTypeName(device_type, true),
              "): tensors must be on a ", c10::DeviceTypeName(device_type), " device, got ",
              logp.device());
  TORCH_CHECK(ref_sq.has_value() == kl_weight.has_value(), op,
              ": ref_sq and kl_weight go together (both for a reference policy, or neither)");
}

// t: contiguous, of shape `sizes`, logp's dtype and device.
inline void check_like_logp(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& logp, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == logp.scalar_type() && t.is_contiguous() &&
                  t.device() == logp.device(),
              op, ": ", name, " must be a contiguous ", sizes, " ", logp.scalar_type(),
              " tensor on ", logp.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ",
              t.device());
}

// A [rows, n] input of the map losses read row by row (old_log_prob, advantage_map): of shape
// `sizes`, logp's dtype and device, each row contiguous and any batch stride, so the per-step
// slices [:, j] of log-probs or maps stored for a whole trajectory are read in place.
inline void check_rows_like_logp(const char* op, const char* name, const at::Tensor& t,
                                 const at::Tensor& logp, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == logp.scalar_type() &&
                  batch_stride(t) >= 0 && t.device() == logp.device(),
              op, ": ", name, " must be a ", sizes, " ", logp.scalar_type(), " tensor on ",
              logp.device(), " with each row contiguous, got ", t.sizes(), " ", t.scalar_type(),
              " strides ", t.strides(), " on ", t.device());
}

// The row stride of such an input: elements between row b and row b + 1, 0 for a single row
// shared by the batch (a [1, n] map).
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : batch_stride(t); }

inline void check_clip(const char* op, double clip_range, double adv_clip_max) {
  TORCH_CHECK(clip_range > 0 && adv_clip_max > 0, op,
              ": clip_range and adv_clip_max must be > 0, got ", clip_range, ", ", adv_clip_max);
}

// flow_grpo_surrogate's arguments: logp, old_log_prob, advantages (and ref_sq, kl_weight, both or
// neither) contiguous [B] tensors of one accumulation dtype (float32 or float64) on one device of
// `device_type`. Returns B.
inline int64_t check_surrogate_args(const at::Tensor& logp, const std::optional<at::Tensor>& ref_sq,
                                    const std::optional<at::Tensor>& kl_weight,
                                    const at::Tensor& old_log_prob, const at::Tensor& advantages,
                                    double clip_range, double adv_clip_max,
                                    c10::DeviceType device_type) {
  const char* op = "flow_grpo_surrogate";
  check_surrogate_logp(op, logp, 1, "[B]", ref_sq, kl_weight, device_type);
  check_like_logp(op, "logp", logp, logp, logp.sizes());               // contiguous
  check_like_logp(op, "old_log_prob", old_log_prob, logp, logp.sizes());
  check_like_logp(op, "advantages", advantages, logp, logp.sizes());
  if (ref_sq.has_value()) check_like_logp(op, "ref_sq", *ref_sq, logp, logp.sizes());
  if (kl_weight.has_value()) check_like_logp(op, "kl_weight", *kl_weight, logp, logp.sizes());
  check_clip(op, clip_range, adv_clip_max);
  return logp.size(0);
}

// flow_grpo_map_surrogate's arguments: logp contiguous [B, P], old_log_prob [B, P] and
// advantage_map [B, P] or [1, P] with contiguous rows (any row stride: check_rows_like_logp),
// advantages (and ref_sq, kl_weight, both or neither) contiguous [B], all of one accumulation
// dtype (float32 or float64) on one device of `device_type`. Returns {B, P}.
inline std::pair<int64_t, int64_t> check_map_surrogate_args(
    const at::Tensor& logp, const std::optional<at::Tensor>& ref_sq,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, const at::Tensor& advantage_map, double clip_range,
    double adv_clip_max, c10::DeviceType device_type) {
  const char* op = "flow_grpo_map_surrogate";
  check_surrogate_logp(op, logp, 2, "[B, positions]", ref_sq, kl_weight, device_type);
  const int64_t B = logp.size(0), P = logp.size(1);
  const int64_t map_rows = advantage_map.dim() == 2 && advantage_map.size(0) == 1 ? 1 : B;
  check_like_logp(op, "logp", logp, logp, {B, P});                       // contiguous
  check_rows_like_logp(op, "old_log_prob", old_log_prob, logp, {B, P});
  check_like_logp(op, "advantages", advantages, logp, {B});
  check_rows_like_logp(op, "advantage_map", advantage_map, logp, {map_rows, P});
  if (ref_sq.has_value()) check_like_logp(op, "ref_sq", *ref_sq, logp, {B});
  if (kl_weight.has_value()) check_like_logp(op, "kl_weight", *kl_weight, logp, {B});
  check_clip(op, clip_range, adv_clip_max);
  return {B, P};
}

// flow_grpo_elem_loss's arguments: the latents as flow_step_forward's (prev_sample required), and
// old_log_prob [B, N] and advantage_map [B, N] or [1, N] with contiguous rows (any row stride),
// advantages [B] (and kl_weight [B], exactly when ref is given) contiguous, all in the
// accumulation dtype on the latents' device.
// old_log_prob and advantage_map of the per-element loss: like check_rows_like_logp, except
// that with float32 accumulation each may also be bfloat16 or float16 (read as it is, widened
// per element: a converted float32 copy would be a full-size temporary) where the backend
// reads those (`reduced_ok`).
inline void check_elem_rows(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& coefs, at::IntArrayRef sizes, bool reduced_ok) {
  const auto st = t.scalar_type();
  const bool reduced = reduced_ok && coefs.scalar_type() == at::kFloat &&
                       (st == at::kBFloat16 || st == at::kHalf);
  if (!reduced) return check_rows_like_logp(op, name, t, coefs, sizes);
  TORCH_CHECK(t.sizes() == sizes && batch_stride(t) >= 0 && t.device() == coefs.device(), op,
              ": ", name, " must be a ", sizes, " tensor on ", coefs.device(),
              " with each row contiguous, got ", t.sizes(), " strides ", t.strides(), " on ",
              t.device());
}

inline Layout check_elem_loss_args(const at::Tensor& v, const at::Tensor& x, const at::Tensor& prev,
                                   const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
                                   const std::optional<at::Tensor>& kl_weight,
                                   const at::Tensor& old_log_prob, const at::Tensor& advantages,
                                   const at::Tensor& advantage_map, double clip_range,
                                   double adv_clip_max, c10::DeviceType device_type,
                                   bool reduced_rows_ok = false) {
  const char* op = "flow_grpo_elem_loss";
  const Layout L = check_latents(v, x, op, device_type);
  check_like(prev, x, "sample", "prev_sample", op);
  check_like(ref, v, "model_output", "ref_model_output", op);
  check_coefs(coefs, v, op);
  TORCH_CHECK(ref.has_value() == kl_weight.has_value(), op,
              ": ref_model_output and kl_weight go together (both for a reference policy, or "
              "neither)");
  const int64_t N = L.C * L.S;
  const int64_t map_rows = advantage_map.dim() == 2 && advantage_map.size(0) == 1 ? 1 : L.B;
  check_elem_rows(op, "old_log_prob", old_log_prob, coefs, {L.B, N}, reduced_rows_ok);
  check_like_logp(op, "advantages", advantages, coefs, {L.B});
  check_elem_rows(op, "advantage_map", advantage_map, coefs, {map_rows, N}, reduced_rows_ok);
  if (kl_weight.has_value()) check_like_logp(op, "kl_weight", *kl_weight, coefs, {L.B});
  check_clip(op, clip_range, adv_clip_max);
  return L;
}

// flow_grpo_elem_loss's outputs: loss [] and metrics [4] in the accumulation dtype, grad_v a
// contiguous tensor of model_output's shape and dtype (or empty without write_grad).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> elem_loss_outputs(const at::Tensor& v,
                                                                        const at::Tensor& coefs,
                                                                        bool write_grad) {
  return {at::empty({}, coefs.options()), at::empty({4}, coefs.options()),
          write_grad ? latent_output(v) : at::empty({0}, v.options())};
}

// flow_grpo_map_surrogate's outputs, allocated like logp: loss [], metrics [4], grad_ref_sq [B].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> map_surrogate_outputs(
    const at::Tensor& logp) {
  return {at::empty({}, logp.options()), at::empty({4}, logp.options()),
          at::empty({logp.size(0)}, logp.options())};
}

// flow_grpo_surrogate's outputs, allocated like logp: loss [], metrics [4], factors [2, B].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> surrogate_outputs(const at::Tensor& logp) {
  return {at::empty({}, logp.options()), at::empty({4}, logp.options()),
          at::empty({2, logp.size(0)}, logp.options())};
}

}  // namespace flow_step
}  // namespace tbk
