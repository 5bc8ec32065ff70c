// Per-sample mean squared error over whole latents, C++ CPU kernels. Contract:
// python/tbkernels/ops/dpo.py (per_sample_mse) and its reference,
// python/tbkernels/ops/_dpo_reference.py.
//
//   forward:  out[b]     = (1/D) sum_e (pred[b,e] - target[b,e])^2       D = numel / B
//   backward: grad[b, e] = (2 grad_out[b] / D) (pred[b,e] - target[b,e])
//
// This is the denoising error every DPO/KTO loss of diffusion and flow-matching models is built
// on (SPEC.md §7): Diffusion-DPO, Flow-DPO and Diffusion-KTO all start from
// `mse(model_pred.float(), target.float(), reduction="none").mean(dim=non-batch dims)`, which
// materialises two float32 copies and a full-size squared difference per branch, and autograd
// saves one of them. Here the forward reads pred and target once and writes B numbers; the
// backward recomputes the difference (one elementwise pass: reads pred and target, writes grad).
//
// pred and target may have different floating dtypes (a bf16 model output against a float32
// velocity target is the common case); the math is float32 (float64 when either is float64).
// Each (sample, chunk) task sums its chunk in the accumulation type with 16 independent lanes
// (so the loop vectorises without reassociating anything across runs), the chunk totals are
// kept in double and each sample's total is combined in a fixed order: results do not depend on
// the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace tbk {
namespace {

// Elements of one sample handled by one task: large enough to amortise scheduling, small enough
// that B = 1 still spreads over the threads.
constexpr int64_t kChunk = 16384;
constexpr int kLanes = 16;

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType acc_type(at::ScalarType p, at::ScalarType t) {
  return (p == at::kDouble || t == at::kDouble) ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target, const char* op) {
  TORCH_CHECK(pred.dim() >= 1, op, ": pred must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target ", target.sizes(),
              " must have pred's shape ", pred.sizes());
  TORCH_CHECK(supported(pred.scalar_type()) && supported(target.scalar_type()), op,
              ": pred and target must be float32, float64, float16 or bfloat16, got ",
              pred.scalar_type(), " and ", target.scalar_type());
  TORCH_CHECK(pred.is_contiguous() && target.is_contiguous(), op,
              ": pred and target must be contiguous");
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu(), op,
              " (cpu): tensors must be on the CPU, got ", pred.device(), " and ", target.device());
}

template <typename pred_t, typename targ_t, typename acc_t>
void forward_kernel(const pred_t* p, const targ_t* t, int64_t B, int64_t D, acc_t* out) {
  const int64_t nchunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk), tasks = B * nchunk;
  std::vector<double> part(tasks, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nchunk, e0 = (task % nchunk) * kChunk;
      const int64_t n = std::max<int64_t>(0, std::min(kChunk, D - e0));
      const pred_t* pp = p + b * D + e0;
      const targ_t* tt = t + b * D + e0;
      acc_t lane[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const acc_t d = static_cast<acc_t>(pp[j + k]) - static_cast<acc_t>(tt[j + k]);
          lane[k] += d * d;
        }
      }
      for (int k = 0; j < n; ++j, ++k) {
        const acc_t d = static_cast<acc_t>(pp[j]) - static_cast<acc_t>(tt[j]);
        lane[k] += d * d;
      }
      double s = 0.0;
      for (int k = 0; k < kLanes; ++k) s += static_cast<double>(lane[k]);
      part[task] = s;
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t k = 0; k < nchunk; ++k) s += part[b * nchunk + k];
    // D == 0: a mean over no elements is NaN, as torch's mean.
    out[b] = static_cast<acc_t>(s / static_cast<double>(D));
  }
}

template <typename pred_t, typename targ_t, typename acc_t>
void backward_kernel(const acc_t* g, const pred_t* p, const targ_t* t, int64_t B, int64_t D,
                     pred_t* out) {
  const int64_t nchunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk), tasks = B * nchunk;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nchunk, e0 = (task % nchunk) * kChunk;
      const int64_t n = std::max<int64_t>(0, std::min(kChunk, D - e0));
      // d mean(d^2) / d pred_e = 2 d_e / D; the per-sample factor in double, rounded once.
      const acc_t scale = static_cast<acc_t>(2.0 * static_cast<double>(g[b]) /
                                             static_cast<double>(D));
      const pred_t* pp = p + b * D + e0;
      const targ_t* tt = t + b * D + e0;
      pred_t* oo = out + b * D + e0;
      for (int64_t j = 0; j < n; ++j) {
        oo[j] = static_cast<pred_t>(scale *
                                    (static_cast<acc_t>(pp[j]) - static_cast<acc_t>(tt[j])));
      }
    }
  });
}

// Calls f(pred_t{}, targ_t{}) with the C++ types of the two dtypes.
template <typename F>
void dispatch2(at::ScalarType pt, at::ScalarType tt, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pt, "per_sample_mse", [&] {
    using pred_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tt, "per_sample_mse", [&] {
      using targ_t = scalar_t;
      f(pred_t{}, targ_t{});
    });
  });
}

// pred, target [B, ...] contiguous, same shape -> [B] float32 (float64 if either is float64).
at::Tensor per_sample_mse_cpu(const at::Tensor& pred, const at::Tensor& target) {
  const char* op = "per_sample_mse";
  check_inputs(pred, target, op);
  const int64_t B = pred.size(0);
  const int64_t D = B == 0 ? 0 : pred.numel() / B;
  const auto acc = acc_type(pred.scalar_type(), target.scalar_type());
  at::Tensor out = at::empty({B}, pred.options().dtype(acc));
  if (B == 0) return out;
  dispatch2(pred.scalar_type(), target.scalar_type(), [&](auto pz, auto tz) {
    using pred_t = decltype(pz);
    using targ_t = decltype(tz);
    if (acc == at::kDouble) {
      forward_kernel<pred_t, targ_t, double>(pred.data_ptr<pred_t>(), target.data_ptr<targ_t>(),
                                             B, D, out.data_ptr<double>());
    } else {
      forward_kernel<pred_t, targ_t, float>(pred.data_ptr<pred_t>(), target.data_ptr<targ_t>(), B,
                                            D, out.data_ptr<float>());
    }
  });
  return out;
}

// grad_out [B] (accumulation dtype, contiguous) -> grad_pred like pred.
at::Tensor per_sample_mse_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pred,
                                       const at::Tensor& target) {
  const char* op = "per_sample_mse_backward";
  check_inputs(pred, target, op);
  const int64_t B = pred.size(0);
  const int64_t D = B == 0 ? 0 : pred.numel() / B;
  const auto acc = acc_type(pred.scalar_type(), target.scalar_type());
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == B && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == acc && grad_out.device().is_cpu(),
              op, ": grad_out must be a contiguous [", B, "] ", acc, " CPU tensor, got ",
              grad_out.sizes(), " ", grad_out.scalar_type(), " on ", grad_out.device());
  at::Tensor grad = at::empty_like(pred);
  if (pred.numel() == 0) return grad;
  dispatch2(pred.scalar_type(), target.scalar_type(), [&](auto pz, auto tz) {
    using pred_t = decltype(pz);
    using targ_t = decltype(tz);
    if (acc == at::kDouble) {
      backward_kernel<pred_t, targ_t, double>(grad_out.data_ptr<double>(),
                                              pred.data_ptr<pred_t>(), target.data_ptr<targ_t>(),
                                              B, D, grad.data_ptr<pred_t>());
    } else {
      backward_kernel<pred_t, targ_t, float>(grad_out.data_ptr<float>(), pred.data_ptr<pred_t>(),
                                             target.data_ptr<targ_t>(), B, D,
                                             grad.data_ptr<pred_t>());
    }
  });
  return grad;
}

}  // namespace
}  // namespace tbk

// The schemas live here (not in csrc/ops.cpp) as a fragment of the tbkernels library.
TORCH_LIBRARY_FRAGMENT(tbkernels, m) {
  // pred, target [B, ...] same shape, contiguous, float32/float64/float16/bfloat16 (may differ).
  // Returns [B]: mean over the non-batch elements of (pred - target)^2, float32 (float64 when
  // either input is float64).
  m.def("per_sample_mse(Tensor pred, Tensor target) -> Tensor");
  // grad_out [B] in the forward's output dtype. Returns grad_pred like pred:
  // 2 * grad_out[b] / D * (pred - target).
  m.def("per_sample_mse_backward(Tensor grad_out, Tensor pred, Tensor target) -> Tensor");
}

TORCH_LIBRARY_IMPL(tbkernels, CPU, m) {
  m.impl("per_sample_mse", &tbk::per_sample_mse_cpu);
  m.impl("per_sample_mse_backward", &tbk::per_sample_mse_backward_cpu);
}
