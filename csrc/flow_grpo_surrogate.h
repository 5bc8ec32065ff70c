// The per-sample GRPO surrogate of flow_grpo_loss (no advantage map): the "[B] epilogue" that
// follows the fused flow step. One formula shared by the C++ CPU kernel (csrc/cpu/flow_step.cpp)
// and the CUDA kernel (csrc/cuda/flow_step_kernels.cu, also run by the CUDA emulator of the
// tests), so both compute it identically. Torch-free on purpose: the .cu includes it.
//
// Why a kernel for B numbers: on a GPU, the eager form of this arithmetic (clamp, exp, two
// products, maximum, four means, the KL product, the metrics) is ~25 launches in the forward and
// ~20 in the backward, each a few microseconds of host time, while the fused step's own kernels
// take ~0.1 ms at Wan 480p bf16 B=8: the step would wait on the host. Here it is one launch that
// also writes d loss / d logp and d loss / d ref_sq per sample, so the backward is one multiply.
//
// Per sample b (Acc = float, double for float64 latents; every operation in Acc as PyTorch's
// eager formula does it):
//   a = clamp(adv_b, -adv_clip_max, adv_clip_max),  delta = logp_b - old_b,  r = exp(delta)
//   clipped form: u = -a r,  w = -a clamp(r, 1 - clip, 1 + clip),  term = max(u, w)
//   simple form (TeleBoost's -A log pi, vipo_form="simple"): term = -a logp_b
//   kl_b = ref_sq_b * kl_weight_b (0 without a reference)
//   loss = mean(term) + beta mean(kl)   (the beta term only with a reference and beta != 0)
//   metrics = (approx_kl = mean(delta^2) / 2, clipfrac = mean(|r - 1| > clip), mean(kl), mean(r))
// The gradient follows PyTorch's autograd of that formula exactly, ties included: maximum gives
// each operand half the gradient on a tie (u == w, i.e. r inside the clip range), and clamp passes
// the gradient where lo <= r <= hi (bounds inclusive).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TBK_SURROGATE_FN __host__ __device__ __forceinline__
#else
#define TBK_SURROGATE_FN inline
#endif

namespace tbk {
namespace surrogate {

// The per-call constants, already in Acc (PyTorch turns a Python-float clamp bound into the
// tensor's compute type before comparing; lo = 1 - clip is formed in double first, as Python
// does).
template <typename Acc>
struct Constants {
  Acc lo, hi, clip, adv_max, beta;
  bool simple;      // vipo_form == "simple"
  bool has_ref;     // ref_sq and kl_weight given
  Acc inv_b;        // 1 / B, the mean's factor of the gradient
};

template <typename Acc>
Constants<Acc> make_constants(double clip_range, double adv_clip_max, double beta, bool simple,
                              bool has_ref, int64_t batch) {
  Constants<Acc> k;
  k.lo = static_cast<Acc>(1.0 - clip_range);
  k.hi = static_cast<Acc>(1.0 + clip_range);
  k.clip = static_cast<Acc>(clip_range);
  k.adv_max = static_cast<Acc>(adv_clip_max);
  k.beta = static_cast<Acc>(beta);
  k.simple = simple;
  k.has_ref = has_ref;
  k.inv_b = batch > 0 ? Acc(1) / static_cast<Acc>(batch) : Acc(0);
  return k;
}

TBK_SURROGATE_FN float exp_acc(float x) { return expf(x); }
TBK_SURROGATE_FN double exp_acc(double x) { return exp(x); }

// Sums over the batch, accumulated in double.
struct Sums {
  double policy = 0, kl = 0, delta_sq = 0, clipped = 0, ratio = 0;
};

// One sample: adds its terms to `s` and returns d loss / d logp_b in *dlogp and
// d loss / d ref_sq_b in *dref.
template <typename Acc>
TBK_SURROGATE_FN void sample_term(const Constants<Acc>& k, Acc logp, Acc old, Acc adv, Acc ref_sq,
                                  Acc kl_w, Sums& s, Acc* dlogp, Acc* dref) {
  // clamp(adv, -m, m) with NaN passing through, as torch.clamp
  const Acc a = adv < -k.adv_max ? -k.adv_max : (adv > k.adv_max ? k.adv_max : adv);
  const Acc delta = logp - old;
  const Acc r = exp_acc(delta);
  Acc term, g;
  if (k.simple) {
    term = -(a * logp);
    g = -a;
  } else {
    const Acc na = -a;
    const Acc c = r < k.lo ? k.lo : (r > k.hi ? k.hi : r);
    const Acc u = na * r, w = na * c;
    const Acc du = na * r;                                   // d u / d logp (dr/dlogp = r)
    const Acc dw = (r >= k.lo && r <= k.hi) ? na * r : Acc(0);
    // torch.maximum: NaN wins; on a tie each side gets half of the gradient
    term = (u != u || u > w) ? u : w;
    g = u > w ? du : (u < w ? dw : Acc(0.5) * (du + dw));
  }
  const Acc kl = k.has_ref ? ref_sq * kl_w : Acc(0);
  const Acc one = 1;
  s.policy += static_cast<double>(term);
  s.kl += static_cast<double>(kl);
  s.delta_sq += static_cast<double>(delta * delta);
  s.clipped += (r - one < -k.clip || r - one > k.clip) ? 1.0 : 0.0;
  s.ratio += static_cast<double>(r);
  *dlogp = g * k.inv_b;
  *dref = (k.has_ref && k.beta != Acc(0)) ? k.beta * kl_w * k.inv_b : Acc(0);
}

// loss (0-d) and metrics [4] = (approx_kl, clipfrac, kl, ratio_mean) from the batch sums.
template <typename Acc>
TBK_SURROGATE_FN void finish(const Constants<Acc>& k, const Sums& s, int64_t batch, Acc* loss,
                             Acc* metrics) {
  const double n = static_cast<double>(batch);  // B == 0 gives NaN, as the mean of nothing
  double l = s.policy / n;
  if (k.has_ref && k.beta != Acc(0)) l += static_cast<double>(k.beta) * (s.kl / n);
  *loss = static_cast<Acc>(l);
  metrics[0] = static_cast<Acc>(0.5 * (s.delta_sq / n));
  metrics[1] = static_cast<Acc>(s.clipped / n);
  metrics[2] = static_cast<Acc>(s.kl / n);
  metrics[3] = static_cast<Acc>(s.ratio / n);
}

}  // namespace surrogate
}  // namespace tbk
