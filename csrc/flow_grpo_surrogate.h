// The GRPO surrogate of flow_grpo_loss that follows the fused flow step: per sample (no
// advantage map, the "[B] epilogue": sample_term) or per position with a ViPO map (policy_term
// with the advantage A_b * M_p; the means then run over B * positions terms, the KL's over B).
// One formula shared by the C++ CPU kernels (csrc/cpu/flow_step.cpp) and the CUDA kernels
// (csrc/cuda/flow_step_kernels.cu, also run by the CUDA emulator of the tests), so both compute
// it identically. Torch-free on purpose: the .cu includes it.
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
  Acc inv_b;        // 1 / B: the KL mean's factor of the gradient
  Acc inv_n;        // 1 / (number of policy terms): B, or B * positions with a map
};

// `terms` is the number of policy terms the mean runs over: B for the per-sample surrogate,
// B * positions for the map surrogate. The reciprocals are formed in double and rounded once to
// Acc (as a Python float 1/n multiplied into a float32 tensor is).
template <typename Acc>
Constants<Acc> make_constants(double clip_range, double adv_clip_max, double beta, bool simple,
                              bool has_ref, int64_t batch, int64_t terms) {
  Constants<Acc> k;
  k.lo = static_cast<Acc>(1.0 - clip_range);
  k.hi = static_cast<Acc>(1.0 + clip_range);
  k.clip = static_cast<Acc>(clip_range);
  k.adv_max = static_cast<Acc>(adv_clip_max);
  k.beta = static_cast<Acc>(beta);
  k.simple = simple;
  k.has_ref = has_ref;
  k.inv_b = batch > 0 ? static_cast<Acc>(1.0 / static_cast<double>(batch)) : Acc(0);
  k.inv_n = terms > 0 ? static_cast<Acc>(1.0 / static_cast<double>(terms)) : Acc(0);
  return k;
}

TBK_SURROGATE_FN float exp_acc(float x) { return expf(x); }
TBK_SURROGATE_FN double exp_acc(double x) { return exp(x); }

// clamp(adv, -m, m) with NaN passing through, as torch.clamp
template <typename Acc>
TBK_SURROGATE_FN Acc clamp_adv(const Constants<Acc>& k, Acc adv) {
  return adv < -k.adv_max ? -k.adv_max : (adv > k.adv_max ? k.adv_max : adv);
}

// Sums over the policy terms (and the batch, for kl), accumulated in double.
struct Sums {
  double policy = 0, kl = 0, delta_sq = 0, clipped = 0, ratio = 0;
  // The policy sums of one block of terms (the vectorised loops' own reduction variables).
  TBK_SURROGATE_FN void add_policy(double p, double dsq, double c, double r) {
    policy += p;
    delta_sq += dsq;
    clipped += c;
    ratio += r;
  }
};

// The policy term with advantage `a` at ratio r = exp(logp - old): the term and d term / d logp
// (before the mean's 1/n). Branch-free selections (& and | rather than && and ||, which are
// control flow), so that a loop over it vectorises.
template <bool kSimple, typename Acc>
TBK_SURROGATE_FN void policy_value(const Constants<Acc>& k, Acc logp, Acc a, Acc r, Acc& term,
                                   Acc& g) {
  if (kSimple) {
    term = -(a * logp);
    g = -a;
  } else {
    // Every product and comparison is formed before the selections pick among them, so that
    // they are selections rather than branches (the C++ CPU build also needs
    // -fno-trapping-math for GCC to if-convert them: setup.py).
    const Acc na = -a;
    const bool below = r < k.lo, above = r > k.hi;
    const Acc c = below ? k.lo : (above ? k.hi : r);
    const Acc u = na * r, w = na * c;
    const Acc du = u;                                        // d u / d logp (dr/dlogp = r)
    const bool inside = (r >= k.lo) & (r <= k.hi);           // clamp passes lo <= r <= hi
    const Acc dw = inside ? du : Acc(0);
    const Acc tie = Acc(0.5) * (du + dw);
    const bool u_wins = u > w, w_wins = u < w, u_nan = u != u;
    // torch.maximum: NaN wins; on a tie each side gets half of the gradient
    term = (u_nan | u_wins) ? u : w;
    g = u_wins ? du : (w_wins ? dw : tie);
  }
}

template <typename Acc>
TBK_SURROGATE_FN bool is_clipped(const Constants<Acc>& k, Acc r) {
  const Acc d = r - Acc(1);
  const bool lo = d < -k.clip, hi = d > k.clip;
  return lo | hi;
}

// One policy term: log-prob `logp` against `old` with the (clamped, map-weighted) advantage `a`.
// Adds it to `s` and returns d term / d logp (before the mean's 1/n).
template <typename Acc>
TBK_SURROGATE_FN Acc policy_term(const Constants<Acc>& k, Acc logp, Acc old, Acc a, Sums& s) {
  const Acc delta = logp - old;
  const Acc r = exp_acc(delta);
  Acc term, g;
  if (k.simple) policy_value<true>(k, logp, a, r, term, g);
  else policy_value<false>(k, logp, a, r, term, g);
  s.policy += static_cast<double>(term);
  s.delta_sq += static_cast<double>(delta * delta);
  s.clipped += is_clipped(k, r) ? 1.0 : 0.0;
  s.ratio += static_cast<double>(r);
  return g;
}

// d loss / d ref_sq_b of a sample with KL weight kl_w: beta * kl_w / B (0 without a reference
// or with beta == 0, where the KL is only a metric).
template <typename Acc>
TBK_SURROGATE_FN Acc kl_grad(const Constants<Acc>& k, Acc kl_w) {
  return k.has_ref && k.beta != Acc(0) ? k.beta * kl_w * k.inv_b : Acc(0);
}

// One sample's KL: adds ref_sq * kl_w to `s` and returns d loss / d ref_sq_b.
template <typename Acc>
TBK_SURROGATE_FN Acc kl_term(const Constants<Acc>& k, Acc ref_sq, Acc kl_w, Sums& s) {
  if (!k.has_ref) return Acc(0);
  s.kl += static_cast<double>(ref_sq * kl_w);
  return kl_grad(k, kl_w);
}

// One sample of the per-sample surrogate: adds its terms to `s` and returns d loss / d logp_b in
// *dlogp and d loss / d ref_sq_b in *dref.
template <typename Acc>
TBK_SURROGATE_FN void sample_term(const Constants<Acc>& k, Acc logp, Acc old, Acc adv, Acc ref_sq,
                                  Acc kl_w, Sums& s, Acc* dlogp, Acc* dref) {
  *dlogp = policy_term(k, logp, old, clamp_adv(k, adv), s) * k.inv_n;
  *dref = kl_term(k, ref_sq, kl_w, s);
}

// loss (0-d) and metrics [4] = (approx_kl, clipfrac, kl, ratio_mean) from the sums over `terms`
// policy terms and `batch` samples.
template <typename Acc>
TBK_SURROGATE_FN void finish(const Constants<Acc>& k, const Sums& s, int64_t terms,
                             int64_t batch, Acc* loss, Acc* metrics) {
  const double n = static_cast<double>(terms);  // 0 terms give NaN, as the mean of nothing
  const double nb = static_cast<double>(batch);
  double l = s.policy / n;
  if (k.has_ref && k.beta != Acc(0)) l += static_cast<double>(k.beta) * (s.kl / nb);
  *loss = static_cast<Acc>(l);
  metrics[0] = static_cast<Acc>(0.5 * (s.delta_sq / n));
  metrics[1] = static_cast<Acc>(s.clipped / n);
  metrics[2] = static_cast<Acc>(s.kl / nb);
  metrics[3] = static_cast<Acc>(s.ratio / n);
}

}  // namespace surrogate
}  // namespace tbk
