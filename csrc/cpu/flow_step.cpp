// Flow-matching GRPO step: fused SDE-transition log-prob (+ reference-policy distance) forward and
// its backward, C++ CPU kernels. Contract: python/tbkernels/ops/flow_grpo.py; coefficient form:
// python/tbkernels/ops/_flow_grpo_coefs.py.
//
// Per sample b and element e (latent [B, C, S], S = (T·)H·W):
//   mean_e = cx_b x_e + cv_b v_e,   d_e = prev_e - mean_e,   logp_e = alpha_b d_e^2 + gamma_b
// Forward reads v, x, prev (and the reference v_ref) once and writes only the reduced log-prob and
// the per-sample sum (v - v_ref)^2 — no full-size float32 temporaries, unlike the eager formula's
// dozen intermediates. The full-size mean / sampled prev are written only when asked for.
// Backward recomputes mean from the inputs instead of saving it (memory over FLOPs: the op is
// bandwidth-bound, recomputing costs two multiply-adds per element):
//   grad_v_e = cv_b gm_e - 2 alpha_b cv_b gl(e) d_e + 2 gq_b (v_e - vref_e)
// Latent inputs need only each sample contiguous: every one is read at its own batch stride
// (flow_step_checks.h, batch_stride), so Flow-GRPO's trajectory slices latents[:, j] are not
// copied; the outputs are contiguous.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <type_traits>
#include <vector>

#include "../flow_grpo_surrogate.h"
#include "../flow_step_checks.h"
#include "vec_exp.h"

namespace tbk {
namespace {

using flow_step::kReduceChannelSum;
using flow_step::kReduceMean;
using flow_step::kReduceNone;
using flow_step::BatchStrides;
using flow_step::Layout;

// Elements of one channel row handled by one task. A task walks its C channel rows, so each row
// segment is a separate stream for the hardware prefetcher: short segments restart it too often
// (measured on an AMD EPYC, 4 streams of [4,16,21,60,104] fp32, one thread: 4096 -> 7.9 ms,
// 32768 -> 5.9 ms, one contiguous sweep 5.3 ms). A Wan 480p frame set (S = 131040) still gives 4
// tasks per sample, so B = 1 spreads over a few threads; channel_sum's per-task accumulator
// (32768 floats, 128 KiB) stays in L2.
constexpr int64_t kChunk = 32768;

// The ViPO-map surrogates' row functions below are compute-bound on a CPU (an exp, the clipped
// term's selections and four double sums per element), and the extension is built for baseline
// x86-64, whose vectors are 128-bit SSE. On x86-64 with GCC or Clang their entry points get an
// AVX2 clone beside the baseline one, picked when the library loads (ifunc); `flatten` inlines
// the templated loops into each clone so that they are compiled for its ISA. AVX2 without FMA:
// no multiply-add is contracted, so both clones round every operation alike (only the lane
// count of the double reductions differs).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define TBK_CPU_CLONES __attribute__((target_clones("avx2", "default"), flatten))
#else
#define TBK_CPU_CLONES
#endif

inline int64_t num_chunks(const Layout& L) { return (L.S + kChunk - 1) / kChunk; }

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Sample b of a latent (p + b * batch stride), keeping an absent tensor absent.
template <typename T>
T* sample_ptr(T* p, int64_t b, int64_t stride) {
  return p ? p + b * stride : nullptr;
}

// Calls f(vt*, lt*) with null pointers typed by model_output's element type (vt) and the
// latents' (lt): the same type, or a half / bfloat16 model output beside float32 latents
// (flow_step_checks.h, dtypes_supported, has rejected anything else).
template <typename F>
void dispatch_dtypes(const at::Tensor& v, const at::Tensor& x, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "flow_step_cpu", [&] {
    using vt = scalar_t;
    if (x.scalar_type() == v.scalar_type()) {
      f(static_cast<vt*>(nullptr), static_cast<vt*>(nullptr));
    } else if constexpr (std::is_same_v<vt, at::Half> || std::is_same_v<vt, at::BFloat16>) {
      f(static_cast<vt*>(nullptr), static_cast<float*>(nullptr));
    }
  });
}

#define TBK_ELEMENT_TYPES(vtag, ltag)                  \
  using vt = std::remove_pointer_t<decltype(vtag)>; \
  using lt = std::remove_pointer_t<decltype(ltag)>

// One channel row [i0, i0 + n) of sample b. The hot case (a stored prev_sample, no mean output:
// flow_grpo_loss) is compiled branch-free per reduction and reference flag, so the reductions
// vectorise (omp simd lets the compiler reassociate the float sums); the sde_step case with its
// optional outputs keeps runtime branches.
// vt: model_output's (and the reference's) element type; lt: the latents' (sample, prev_sample or
// noise, the mean and sampled outputs). Equal, or a bf16/fp16 model output beside fp32 latents.
template <typename vt, typename lt, typename acc_t>
struct ForwardRow {
  const vt *v, *ref;
  const lt *x, *pn;
  acc_t cx, cv, alpha, gamma, sd;
  bool sampling;
  lt *mean_out, *prev_out;
};

template <int kRed, bool kHasRef, bool kGeneric, typename vt, typename lt, typename acc_t>
inline void forward_row(const ForwardRow<vt, lt, acc_t>& a, int64_t i0, int64_t n,
                        acc_t* chan_acc, acc_t* logp, acc_t& row_sq, acc_t& row_ref) {
  acc_t sq = 0, rf = 0;
  const acc_t cx = a.cx, cv = a.cv, alpha = a.alpha, gamma = a.gamma;
  if constexpr (!kGeneric) {
#pragma omp simd reduction(+ : sq, rf)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = i0 + j;
      const acc_t vi = static_cast<acc_t>(a.v[i]);
      const acc_t d = static_cast<acc_t>(a.pn[i]) - (cx * static_cast<acc_t>(a.x[i]) + cv * vi);
      const acc_t d2 = d * d;
      if constexpr (kRed == kReduceMean) sq += d2;
      if constexpr (kRed == kReduceChannelSum) chan_acc[j] += d2;
      if constexpr (kRed == kReduceNone) logp[i] = alpha * d2 + gamma;
      if constexpr (kHasRef) {
        const acc_t dr = vi - static_cast<acc_t>(a.ref[i]);
        rf += dr * dr;
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = i0 + j;
      const acc_t vi = static_cast<acc_t>(a.v[i]);
      const acc_t mean = cx * static_cast<acc_t>(a.x[i]) + cv * vi;
      acc_t prev;
      if (a.sampling) {
        prev = a.pn ? mean + a.sd * static_cast<acc_t>(a.pn[i]) : mean;
        a.prev_out[i] = static_cast<lt>(prev);
        // The log-prob is of the sample actually stored, so round-trip through its dtype.
        prev = static_cast<acc_t>(a.prev_out[i]);
      } else {
        prev = a.pn ? static_cast<acc_t>(a.pn[i]) : mean;
      }
      if (a.mean_out) a.mean_out[i] = static_cast<lt>(mean);
      const acc_t d = prev - mean, d2 = d * d;
      if constexpr (kRed == kReduceMean) sq += d2;
      if constexpr (kRed == kReduceChannelSum) chan_acc[j] += d2;
      if constexpr (kRed == kReduceNone) logp[i] = alpha * d2 + gamma;
      if constexpr (kHasRef) {
        const acc_t dr = vi - static_cast<acc_t>(a.ref[i]);
        rf += dr * dr;
      }
    }
  }
  row_sq += sq;
  row_ref += rf;
}

template <int kRed, bool kHasRef, bool kGeneric, typename vt, typename lt, typename acc_t>
void forward_tasks(const Layout L, const BatchStrides bs, const ForwardRow<vt, lt, acc_t> proto,
                   const acc_t* coefs, acc_t* logp, std::vector<double>& part_sq,
                   std::vector<double>& part_ref) {
  const int64_t N = L.C * L.S;
  const int64_t nchunk = num_chunks(L), tasks = L.B * nchunk;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> chan_acc(kRed == kReduceChannelSum ? kChunk : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, s0 = (t % nchunk) * kChunk;
      const int64_t n = std::min(kChunk, L.S - s0);
      // The row works on sample b alone: each input at its own batch stride, the outputs
      // (contiguous) at b * N.
      ForwardRow<vt, lt, acc_t> a = proto;
      a.v = sample_ptr(proto.v, b, bs.v);
      a.x = sample_ptr(proto.x, b, bs.x);
      a.pn = sample_ptr(proto.pn, b, bs.prev);
      a.ref = sample_ptr(proto.ref, b, bs.ref);
      a.mean_out = sample_ptr(proto.mean_out, b, N);
      a.prev_out = sample_ptr(proto.prev_out, b, N);
      acc_t* logp_b = kRed == kReduceNone ? logp + b * N : nullptr;
      const acc_t* cf = coefs + b * 5;
      a.cx = cf[0], a.cv = cf[1], a.alpha = cf[2], a.gamma = cf[3], a.sd = cf[4];
      if constexpr (kRed == kReduceChannelSum) std::fill(chan_acc.begin(), chan_acc.begin() + n, acc_t(0));
      double sq_sum = 0.0, ref_sum = 0.0;
      for (int64_t c = 0; c < L.C; ++c) {
        acc_t row_sq = 0, row_ref = 0;
        forward_row<kRed, kHasRef, kGeneric>(a, c * L.S + s0, n, chan_acc.data(), logp_b,
                                             row_sq, row_ref);
        sq_sum += row_sq;
        ref_sum += row_ref;
      }
      if constexpr (kRed == kReduceChannelSum) {
        acc_t* out = logp + b * L.S + s0;
        for (int64_t j = 0; j < n; ++j) out[j] = a.alpha * chan_acc[j] + a.gamma * L.C;
      }
      part_sq[t] = sq_sum;
      part_ref[t] = ref_sum;
    }
  });
}

// Turns the runtime flags into one of the compiled variants above.
template <int kRed, typename vt, typename lt, typename acc_t>
void forward_dispatch_ref(bool has_ref, bool generic, const Layout L, const BatchStrides& bs,
                          const ForwardRow<vt, lt, acc_t>& a, const acc_t* coefs, acc_t* logp,
                          std::vector<double>& ps, std::vector<double>& pr) {
  if (has_ref) {
    generic ? forward_tasks<kRed, true, true>(L, bs, a, coefs, logp, ps, pr)
            : forward_tasks<kRed, true, false>(L, bs, a, coefs, logp, ps, pr);
  } else {
    generic ? forward_tasks<kRed, false, true>(L, bs, a, coefs, logp, ps, pr)
            : forward_tasks<kRed, false, false>(L, bs, a, coefs, logp, ps, pr);
  }
}

template <typename vt, typename lt, typename acc_t>
void forward_kernel(const Layout L, const BatchStrides& bs, const vt* v, const lt* x, const lt* pn,
                    const vt* ref, const acc_t* coefs, int64_t reduction, bool sampling,
                    acc_t* logp, acc_t* ref_sq, lt* mean_out, lt* prev_out) {
  const int64_t nchunk = num_chunks(L), tasks = L.B * nchunk;
  // Per-task partial sums, combined per sample afterwards in a fixed order (deterministic).
  std::vector<double> part_sq(tasks, 0.0), part_ref(tasks, 0.0);
  const ForwardRow<vt, lt, acc_t> a{v, ref, x, pn, 0, 0, 0, 0, 0, sampling, mean_out, prev_out};
  const bool generic = sampling || pn == nullptr || mean_out != nullptr;
  const bool has_ref = ref != nullptr;
  if (reduction == kReduceMean)
    forward_dispatch_ref<kReduceMean>(has_ref, generic, L, bs, a, coefs, logp, part_sq, part_ref);
  else if (reduction == kReduceChannelSum)
    forward_dispatch_ref<kReduceChannelSum>(has_ref, generic, L, bs, a, coefs, logp, part_sq, part_ref);
  else
    forward_dispatch_ref<kReduceNone>(has_ref, generic, L, bs, a, coefs, logp, part_sq, part_ref);
  const double D = static_cast<double>(L.C * L.S);
  for (int64_t b = 0; b < L.B; ++b) {
    double sq = 0.0, rs = 0.0;
    for (int64_t k = 0; k < nchunk; ++k) {
      sq += part_sq[b * nchunk + k];
      rs += part_ref[b * nchunk + k];
    }
    if (reduction == kReduceMean) {
      logp[b] = static_cast<acc_t>(static_cast<double>(coefs[b * 5 + 2]) * sq / D +
                                   static_cast<double>(coefs[b * 5 + 3]));
    }
    ref_sq[b] = static_cast<acc_t>(rs);
  }
}

// Backward over one channel row when grad_logp and prev are given and grad_mean is not (the
// loss path): no branches in the loop, so it vectorises. kReducePerElement covers channel_sum and
// none, whose grad_logp row is indexed by j (gl_row points at this row's first entry).
constexpr int kReducePerElement = 3;

template <int kRed, bool kHasRef, typename vt, typename lt, typename acc_t>
inline void backward_row(const vt* v, const lt* x, const lt* prev,
                         const vt* ref, int64_t i0, int64_t n, acc_t cx, acc_t cv,
                         acc_t lp_scale, acc_t gl_sample, const acc_t* gl_row, acc_t gq2,
                         vt* grad_v) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = i0 + j;
    const acc_t vi = static_cast<acc_t>(v[i]);
    const acc_t d = static_cast<acc_t>(prev[i]) - (cx * static_cast<acc_t>(x[i]) + cv * vi);
    const acc_t gl = kRed == kReduceMean ? gl_sample : gl_row[j];
    acc_t g = lp_scale * gl * d;
    if constexpr (kHasRef) g += gq2 * (vi - static_cast<acc_t>(ref[i]));
    grad_v[i] = static_cast<vt>(g);
  }
}

template <typename vt, typename lt, typename acc_t>
void backward_kernel(const Layout L, const BatchStrides& bs, const vt* v, const lt* x, const lt* prev,
                     const vt* ref, const acc_t* coefs, int64_t reduction,
                     const acc_t* grad_logp, const lt* grad_mean, const acc_t* grad_ref_sq,
                     vt* grad_v) {
  const int64_t nchunk = num_chunks(L), tasks = L.B * nchunk, N = L.C * L.S;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(N);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, s0 = (t % nchunk) * kChunk;
      const int64_t n = std::min(kChunk, L.S - s0);
      // Sample b alone: each input at its own batch stride, grad_v and a per-element grad_logp
      // (contiguous) at b * N.
      const vt* v_b = sample_ptr(v, b, bs.v);
      const lt* x_b = sample_ptr(x, b, bs.x);
      const lt* prev_b = sample_ptr(prev, b, bs.prev);
      const vt* ref_b = sample_ptr(ref, b, bs.ref);
      const lt* gm_b = sample_ptr(grad_mean, b, bs.grad_mean);
      vt* gv_b = grad_v + b * N;
      const acc_t* cf = coefs + b * 5;
      const acc_t cx = cf[0], cv = cf[1], alpha = cf[2];
      // d logp_e / d v_e = -2 alpha cv d_e; fold the per-sample factors once.
      const acc_t lp_scale = acc_t(-2) * alpha * cv;
      const acc_t gl_sample = (grad_logp && reduction == kReduceMean) ? grad_logp[b] * inv_d : 0;
      const acc_t gq2 = grad_ref_sq ? acc_t(2) * grad_ref_sq[b] : 0;
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t base = c * L.S + s0;  // within sample b
        if (grad_logp && prev && !grad_mean) {  // flow_grpo_loss: the branch-free variants
          const acc_t* gl_row = reduction == kReduceChannelSum ? grad_logp + b * L.S + s0
                                : reduction == kReduceNone     ? grad_logp + b * N + base
                                                               : nullptr;
          const bool with_ref = grad_ref_sq && ref;
          if (reduction == kReduceMean)
            with_ref ? backward_row<kReduceMean, true>(v_b, x_b, prev_b, ref_b, base, n, cx, cv, lp_scale, gl_sample, gl_row, gq2, gv_b)
                     : backward_row<kReduceMean, false>(v_b, x_b, prev_b, ref_b, base, n, cx, cv, lp_scale, gl_sample, gl_row, gq2, gv_b);
          else
            with_ref ? backward_row<kReducePerElement, true>(v_b, x_b, prev_b, ref_b, base, n, cx, cv, lp_scale, gl_sample, gl_row, gq2, gv_b)
                     : backward_row<kReducePerElement, false>(v_b, x_b, prev_b, ref_b, base, n, cx, cv, lp_scale, gl_sample, gl_row, gq2, gv_b);
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = base + j;
          const acc_t vi = static_cast<acc_t>(v_b[i]);
          acc_t g = 0;
          if (grad_logp) {
            const acc_t mean = cx * static_cast<acc_t>(x_b[i]) + cv * vi;
            const acc_t d = (prev_b ? static_cast<acc_t>(prev_b[i]) : mean) - mean;
            const acc_t gl = reduction == kReduceMean        ? gl_sample
                             : reduction == kReduceChannelSum ? grad_logp[b * L.S + s0 + j]
                                                              : grad_logp[b * N + i];
            g += lp_scale * gl * d;
          }
          if (gm_b) g += cv * static_cast<acc_t>(gm_b[i]);
          if (grad_ref_sq && ref_b) g += gq2 * (vi - static_cast<acc_t>(ref_b[i]));
          gv_b[i] = static_cast<vt>(g);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_step_forward_cpu(
    const at::Tensor& v, const at::Tensor& x, const std::optional<at::Tensor>& prev_or_noise,
    const std::optional<at::Tensor>& ref, const at::Tensor& coefs, int64_t reduction,
    bool sampling, bool write_mean) {
  const Layout L = flow_step::check_forward_args(v, x, prev_or_noise, ref, coefs, reduction,
                                                 sampling, c10::DeviceType::CPU);
  const auto acc = flow_step::acc_type(x.scalar_type());
  at::Tensor logp = at::empty(flow_step::logp_shape(v, reduction), v.options().dtype(acc));
  at::Tensor ref_sq = at::empty({L.B}, v.options().dtype(acc));
  // the mean and the sampled prev_sample are latents: the latents' dtype
  at::Tensor mean = write_mean ? flow_step::latent_output(x) : at::empty({0}, x.options());
  at::Tensor prev = sampling ? flow_step::latent_output(x) : at::empty({0}, x.options());
  dispatch_dtypes(v, x, [&](auto* vtag, auto* ltag) {
    TBK_ELEMENT_TYPES(vtag, ltag);
    using acc_t = at::opmath_type<lt>;
    forward_kernel<vt, lt, acc_t>(
        L, flow_step::batch_strides(L, v, x, prev_or_noise, ref), v.data_ptr<vt>(),
        x.data_ptr<lt>(), opt_ptr<lt>(prev_or_noise), opt_ptr<vt>(ref), coefs.data_ptr<acc_t>(),
        reduction, sampling,
        logp.data_ptr<acc_t>(), ref_sq.data_ptr<acc_t>(),
        write_mean ? mean.data_ptr<lt>() : nullptr, sampling ? prev.data_ptr<lt>() : nullptr);
  });
  return {logp, ref_sq, mean, prev};
}

at::Tensor flow_step_backward_cpu(const at::Tensor& v, const at::Tensor& x,
                                  const std::optional<at::Tensor>& prev,
                                  const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
                                  int64_t reduction, const std::optional<at::Tensor>& grad_logp,
                                  const std::optional<at::Tensor>& grad_mean,
                                  const std::optional<at::Tensor>& grad_ref_sq) {
  const Layout L = flow_step::check_backward_args(v, x, prev, ref, coefs, reduction, grad_logp,
                                                  grad_mean, grad_ref_sq, c10::DeviceType::CPU);
  at::Tensor grad_v = flow_step::latent_output(v);
  dispatch_dtypes(v, x, [&](auto* vtag, auto* ltag) {
    TBK_ELEMENT_TYPES(vtag, ltag);
    using acc_t = at::opmath_type<lt>;
    backward_kernel<vt, lt, acc_t>(L, flow_step::batch_strides(L, v, x, prev, ref, grad_mean),
                                     v.data_ptr<vt>(), x.data_ptr<lt>(),
                                     opt_ptr<lt>(prev), opt_ptr<vt>(ref),
                                     coefs.data_ptr<acc_t>(), reduction, opt_ptr<acc_t>(grad_logp),
                                     opt_ptr<lt>(grad_mean), opt_ptr<acc_t>(grad_ref_sq),
                                     grad_v.data_ptr<vt>());
  });
  return grad_v;
}

// The per-sample surrogate epilogue (formula: csrc/flow_grpo_surrogate.h). B is small (a batch
// of samples, not of elements): one sequential pass, sums in double in sample order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_grpo_surrogate_cpu(
    const at::Tensor& logp, const std::optional<at::Tensor>& ref_sq,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, double clip_range, double adv_clip_max, double beta,
    bool simple) {
  const int64_t B = flow_step::check_surrogate_args(logp, ref_sq, kl_weight, old_log_prob,
                                                    advantages, clip_range, adv_clip_max,
                                                    c10::DeviceType::CPU);
  at::Tensor loss, metrics, factors;
  std::tie(loss, metrics, factors) = flow_step::surrogate_outputs(logp);
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "flow_grpo_surrogate_cpu", [&] {
    using Acc = scalar_t;
    const auto k = surrogate::make_constants<Acc>(clip_range, adv_clip_max, beta, simple,
                                                  ref_sq.has_value(), B, B);
    const Acc* lp = logp.data_ptr<Acc>();
    const Acc* old = old_log_prob.data_ptr<Acc>();
    const Acc* adv = advantages.data_ptr<Acc>();
    const Acc* rs = opt_ptr<Acc>(ref_sq);
    const Acc* kw = opt_ptr<Acc>(kl_weight);
    Acc* f = factors.data_ptr<Acc>();
    surrogate::Sums sums;
    for (int64_t b = 0; b < B; ++b) {
      surrogate::sample_term(k, lp[b], old[b], adv[b], rs ? rs[b] : Acc(0), kw ? kw[b] : Acc(0),
                             sums, f + b, f + B + b);
    }
    surrogate::finish(k, sums, B, B, loss.data_ptr<Acc>(), metrics.data_ptr<Acc>());
  });
  return {loss, metrics, factors};
}

// One task's positions of the map surrogate, in blocks of kMapBlock: the ratios first (the
// vectorisable exp of vec_exp.h), then one branch-free pass that vectorises (the selections
// become blends; setup.py's -fno-trapping-math): the term, the gradient written over logp, and
// the sums, in double as everywhere else. Measured on this AMD EPYC VM, one thread, [4, 2.1M]
// float32: written as one scalar loop with branches the op took 17 ns per position; with the
// ratios by libm expf 4.1 ns, of which expf alone ~3.4.
constexpr int64_t kMapBlock = 256;

template <bool kSimple, typename Acc>
void map_surrogate_row(const surrogate::Constants<Acc>& k, Acc a_b, Acc* row, const Acc* old_row,
                       const Acc* map_row, int64_t n, surrogate::Sums& s) {
  Acc ratio[kMapBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kMapBlock) {
    const int64_t m = std::min(kMapBlock, n - j0);
    Acc* lp = row + j0;
    const Acc* old = old_row + j0;
    const Acc* amap = map_row + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) ratio[j] = vec::exp(lp[j] - old[j]);
    double policy = 0, delta_sq = 0, clipped = 0, ratio_sum = 0;   // vectorised in double too
#pragma omp simd reduction(+ : policy, delta_sq, clipped, ratio_sum)
    for (int64_t j = 0; j < m; ++j) {
      const Acc logp = lp[j], delta = logp - old[j], r = ratio[j];
      Acc term, g;
      surrogate::policy_value<kSimple>(k, logp, a_b * amap[j], r, term, g);
      lp[j] = g * k.inv_n;
      policy += static_cast<double>(term);
      delta_sq += static_cast<double>(delta * delta);
      clipped += surrogate::is_clipped(k, r) ? 1.0 : 0.0;
      ratio_sum += static_cast<double>(r);
    }
    s.add_policy(policy, delta_sq, clipped, ratio_sum);
  }
}

template <typename Acc>
inline void map_surrogate_row_form(const surrogate::Constants<Acc>& k, Acc a_b, Acc* row,
                                   const Acc* old_row, const Acc* map_row, int64_t n,
                                   surrogate::Sums& s) {
  if (k.simple) map_surrogate_row<true>(k, a_b, row, old_row, map_row, n, s);
  else map_surrogate_row<false>(k, a_b, row, old_row, map_row, n, s);
}

TBK_CPU_CLONES void map_surrogate_rows(const surrogate::Constants<float>& k, float a_b,
                                       float* row, const float* old_row, const float* map_row,
                                       int64_t n, surrogate::Sums& s) {
  map_surrogate_row_form(k, a_b, row, old_row, map_row, n, s);
}

TBK_CPU_CLONES void map_surrogate_rows(const surrogate::Constants<double>& k, double a_b,
                                       double* row, const double* old_row,
                                       const double* map_row, int64_t n, surrogate::Sums& s) {
  map_surrogate_row_form(k, a_b, row, old_row, map_row, n, s);
}

// The surrogate with a ViPO map (formula: csrc/flow_grpo_surrogate.h, one policy term per
// position). Tasks of kChunk positions of one sample, each with its own partial sums, combined
// afterwards in task order (deterministic whatever the thread count); each position's gradient
// overwrites its log-prob as soon as it is read.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_grpo_map_surrogate_cpu(
    at::Tensor& logp, const std::optional<at::Tensor>& ref_sq,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, const at::Tensor& advantage_map, double clip_range,
    double adv_clip_max, double beta, bool simple) {
  const auto [B, P] = flow_step::check_map_surrogate_args(
      logp, ref_sq, kl_weight, old_log_prob, advantages, advantage_map, clip_range, adv_clip_max,
      c10::DeviceType::CPU);
  at::Tensor loss, metrics, grad_ref_sq;
  std::tie(loss, metrics, grad_ref_sq) = flow_step::map_surrogate_outputs(logp);
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "flow_grpo_map_surrogate_cpu", [&] {
    using Acc = scalar_t;
    const auto k = surrogate::make_constants<Acc>(clip_range, adv_clip_max, beta, simple,
                                                  ref_sq.has_value(), B, B * P);
    Acc* lp = logp.data_ptr<Acc>();
    const Acc* old = old_log_prob.data_ptr<Acc>();
    const Acc* adv = advantages.data_ptr<Acc>();
    const Acc* amap = advantage_map.data_ptr<Acc>();
    // old_log_prob and the map are read at their row strides (trajectory slices in place)
    const int64_t old_stride = flow_step::row_stride(old_log_prob);
    const int64_t map_stride = flow_step::row_stride(advantage_map);
    const int64_t nchunk = (P + kChunk - 1) / kChunk, tasks = B * nchunk;
    std::vector<surrogate::Sums> part(tasks);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nchunk, p0 = (t % nchunk) * kChunk;
        const int64_t n = std::min(kChunk, P - p0);
        const Acc a_b = surrogate::clamp_adv(k, adv[b]);
        Acc* row = lp + b * P + p0;
        const Acc* old_row = old + b * old_stride + p0;
        const Acc* map_row = amap + b * map_stride + p0;
        surrogate::Sums s;
        map_surrogate_rows(k, a_b, row, old_row, map_row, n, s);
        part[t] = s;
      }
    });
    surrogate::Sums total;
    for (const auto& s : part) {
      total.add_policy(s.policy, s.delta_sq, s.clipped, s.ratio);
    }
    const Acc* rs = opt_ptr<Acc>(ref_sq);
    const Acc* kw = opt_ptr<Acc>(kl_weight);
    Acc* dref = grad_ref_sq.data_ptr<Acc>();
    for (int64_t b = 0; b < B; ++b)
      dref[b] = surrogate::kl_term(k, rs ? rs[b] : Acc(0), kw ? kw[b] : Acc(0), total);
    surrogate::finish(k, total, B * P, B, loss.data_ptr<Acc>(), metrics.data_ptr<Acc>());
  });
  return {loss, metrics, grad_ref_sq};
}

// flow_grpo_loss with a per-element map, the step and the surrogate fused (formula: csrc/ops.cpp
// and csrc/flow_grpo_surrogate.h). Every gradient term is elementwise once the per-sample
// constants are known, so one pass computes per element the log-prob, the ratio, the policy term
// and d loss / d v: the inputs are read once, grad_v written once, and no [B, N] float32 log-prob
// ever exists. Each block of kMapBlock elements goes in three vectorised sweeps whose scratch
// (d, logp, ratio) stays in L1: written as one loop, GCC's if-conversion gave up on the body and
// the loop ran scalar (measured 5x slower).
enum ElemRef : int { kNoRef = 0, kRefSum = 1, kRefSumGrad = 2 };

// old_log_prob or the map, read in the accumulation type or stored as bfloat16 / float16 beside
// float32 accumulation (a float32 copy would be a full-size temporary): such a row is widened
// one block at a time into scratch that stays in L1.
struct RowIn {
  const void* p;
  at::ScalarType type;
};

inline RowIn row_in(const at::Tensor& t, int64_t offset) {
  return {static_cast<const char*>(t.data_ptr()) + offset * t.element_size(), t.scalar_type()};
}

template <typename Acc>
inline const Acc* row_block(const RowIn& in, int64_t j0, int64_t m, Acc* scratch) {
  if constexpr (std::is_same_v<Acc, float>) {
    if (in.type == at::kBFloat16) {
      const c10::BFloat16* src = static_cast<const c10::BFloat16*>(in.p) + j0;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) scratch[j] = static_cast<float>(src[j]);
      return scratch;
    }
    if (in.type == at::kHalf) {
      const c10::Half* src = static_cast<const c10::Half*>(in.p) + j0;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) scratch[j] = static_cast<float>(src[j]);
      return scratch;
    }
  }
  return static_cast<const Acc*>(in.p) + j0;     // the accumulation type (checked by the caller)
}

template <typename vt, typename lt, typename Acc>
struct ElemRow {  // one task's slice of one sample, and that sample's constants
  const vt *v, *ref;
  const lt *x, *prev;
  RowIn old, amap;
  vt* grad_v;
  Acc cx, cv, alpha, gamma, a_b, lp_scale, gq2;
};

template <bool kSimple, int kRef, bool kGrad, typename vt, typename lt, typename Acc>
void elem_loss_row(const surrogate::Constants<Acc>& k, const ElemRow<vt, lt, Acc>& r,
                   int64_t n, surrogate::Sums& s, double& ref_sq) {
  // Locals, not r's fields: a store through grad_v (an Acc* for float32) could alias a field of
  // r as far as the compiler knows, which reloads every field per element and stops the
  // vectorisation (measured 2.5x slower).
  const Acc cx = r.cx, cv = r.cv, alpha = r.alpha, gamma = r.gamma, a_b = r.a_b;
  const Acc lp_scale = r.lp_scale, gq2 = r.gq2, inv_n = k.inv_n;
  const surrogate::Constants<Acc> kc = k;
  Acc d[kMapBlock], lp[kMapBlock], ratio[kMapBlock], old_buf[kMapBlock], map_buf[kMapBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kMapBlock) {
    const int64_t m = std::min(kMapBlock, n - j0);
    const vt* __restrict__ v = r.v + j0;
    const lt* __restrict__ x = r.x + j0;
    const lt* __restrict__ prev = r.prev + j0;
    const vt* __restrict__ ref = kRef != kNoRef ? r.ref + j0 : nullptr;
    const Acc* __restrict__ old = row_block(r.old, j0, m, old_buf);
    const Acc* __restrict__ amap = row_block(r.amap, j0, m, map_buf);
    vt* __restrict__ grad_v = kGrad ? r.grad_v + j0 : nullptr;
    double rsq = 0;
#pragma omp simd reduction(+ : rsq)
    for (int64_t j = 0; j < m; ++j) {
      const Acc vi = static_cast<Acc>(v[j]);
      const Acc dj = static_cast<Acc>(prev[j]) - (cx * static_cast<Acc>(x[j]) + cv * vi);
      d[j] = dj;
      lp[j] = alpha * (dj * dj) + gamma;
      if constexpr (kRef != kNoRef) {
        const Acc dr = vi - static_cast<Acc>(ref[j]);
        rsq += static_cast<double>(dr * dr);
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) ratio[j] = vec::exp(lp[j] - old[j]);
    double policy = 0, delta_sq = 0, clipped = 0, ratio_sum = 0;
#pragma omp simd reduction(+ : policy, delta_sq, clipped, ratio_sum)
    for (int64_t j = 0; j < m; ++j) {
      const Acc logp = lp[j], delta = logp - old[j], rt = ratio[j];
      Acc term, g;
      surrogate::policy_value<kSimple>(kc, logp, a_b * amap[j], rt, term, g);
      if constexpr (kGrad) {
        // the grouping of the unfused path: d loss / d logp first, then the step's chain rule
        Acc gv = (lp_scale * (g * inv_n)) * d[j];
        if constexpr (kRef == kRefSumGrad) gv += gq2 * (static_cast<Acc>(v[j]) - static_cast<Acc>(ref[j]));
        grad_v[j] = static_cast<vt>(gv);
      }
      policy += static_cast<double>(term);
      delta_sq += static_cast<double>(delta * delta);
      clipped += surrogate::is_clipped(kc, rt) ? 1.0 : 0.0;
      ratio_sum += static_cast<double>(rt);
    }
    s.add_policy(policy, delta_sq, clipped, ratio_sum);
    ref_sq += rsq;
  }
}

template <bool kSimple, int kRef, typename vt, typename lt, typename Acc>
void elem_loss_row_grad(bool grad, const surrogate::Constants<Acc>& k,
                        const ElemRow<vt, lt, Acc>& r, int64_t n, surrogate::Sums& s,
                        double& ref_sq) {
  grad ? elem_loss_row<kSimple, kRef, true>(k, r, n, s, ref_sq)
       : elem_loss_row<kSimple, kRef, false>(k, r, n, s, ref_sq);
}

template <bool kSimple, typename vt, typename lt, typename Acc>
void elem_loss_row_ref(int ref_mode, bool grad, const surrogate::Constants<Acc>& k,
                       const ElemRow<vt, lt, Acc>& r, int64_t n, surrogate::Sums& s,
                       double& ref_sq) {
  if (ref_mode == kRefSumGrad) elem_loss_row_grad<kSimple, kRefSumGrad>(grad, k, r, n, s, ref_sq);
  else if (ref_mode == kRefSum) elem_loss_row_grad<kSimple, kRefSum>(grad, k, r, n, s, ref_sq);
  else elem_loss_row_grad<kSimple, kNoRef>(grad, k, r, n, s, ref_sq);
}

template <typename vt, typename lt, typename Acc>
inline void elem_loss_row_form(const surrogate::Constants<Acc>& k, int ref_mode, bool grad,
                               const ElemRow<vt, lt, Acc>& r, int64_t n, surrogate::Sums& s,
                               double& ref_sq) {
  if (k.simple) elem_loss_row_ref<true>(ref_mode, grad, k, r, n, s, ref_sq);
  else elem_loss_row_ref<false>(ref_mode, grad, k, r, n, s, ref_sq);
}

// One entry point per latent dtype (target_clones needs plain functions, not templates).
#define TBK_ELEM_ROWS(vt, lt, Acc)                                                           \
  TBK_CPU_CLONES void elem_loss_rows(const surrogate::Constants<Acc>& k, int ref_mode,       \
                                     bool grad, const ElemRow<vt, lt, Acc>& r, int64_t n,    \
                                     surrogate::Sums& s, double& ref_sq) {                   \
    elem_loss_row_form(k, ref_mode, grad, r, n, s, ref_sq);                                  \
  }
TBK_ELEM_ROWS(float, float, float)
TBK_ELEM_ROWS(double, double, double)
TBK_ELEM_ROWS(c10::Half, c10::Half, float)
TBK_ELEM_ROWS(c10::BFloat16, c10::BFloat16, float)
TBK_ELEM_ROWS(c10::Half, float, float)        // a half / bfloat16 model output, fp32 latents
TBK_ELEM_ROWS(c10::BFloat16, float, float)
#undef TBK_ELEM_ROWS

// Tasks of kChunk elements of one sample, each with its own partial sums, combined afterwards in
// task order (deterministic whatever the thread count), as flow_grpo_map_surrogate_cpu.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_grpo_elem_loss_cpu(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& prev,
    const std::optional<at::Tensor>& ref, const at::Tensor& coefs,
    const std::optional<at::Tensor>& kl_weight, const at::Tensor& old_log_prob,
    const at::Tensor& advantages, const at::Tensor& advantage_map, double clip_range,
    double adv_clip_max, double beta, bool simple, bool write_grad) {
  const Layout L = flow_step::check_elem_loss_args(v, x, prev, ref, coefs, kl_weight,
                                                   old_log_prob, advantages, advantage_map,
                                                   clip_range, adv_clip_max, c10::DeviceType::CPU,
                                                   /*reduced_rows_ok=*/true);
  at::Tensor loss, metrics, grad_v;
  std::tie(loss, metrics, grad_v) = flow_step::elem_loss_outputs(v, coefs, write_grad);
  const int64_t B = L.B, N = L.C * L.S;
  const BatchStrides bs = flow_step::batch_strides(L, v, x, prev, ref);
  dispatch_dtypes(v, x, [&](auto* vtag, auto* ltag) {
    TBK_ELEMENT_TYPES(vtag, ltag);
    using Acc = at::opmath_type<lt>;
    const auto k = surrogate::make_constants<Acc>(clip_range, adv_clip_max, beta, simple,
                                                  ref.has_value(), B, B * N);
    const int ref_mode = !ref.has_value() ? kNoRef : (beta != 0 && write_grad ? kRefSumGrad : kRefSum);
    const Acc* cf = coefs.data_ptr<Acc>();
    const Acc* adv = advantages.data_ptr<Acc>();
    const Acc* kw = opt_ptr<Acc>(kl_weight);
    // old_log_prob and the map are read at their row strides (trajectory slices in place)
    const int64_t old_stride = flow_step::row_stride(old_log_prob);
    const int64_t map_stride = flow_step::row_stride(advantage_map);
    const int64_t nchunk = (N + kChunk - 1) / kChunk, tasks = B * nchunk;
    std::vector<surrogate::Sums> part(tasks);
    std::vector<double> part_ref(tasks, 0.0);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nchunk, e0 = (t % nchunk) * kChunk;
        const int64_t n = std::min(kChunk, N - e0), base = b * N + e0;
        ElemRow<vt, lt, Acc> r;
        // the latents at their own batch strides, grad_v contiguous
        r.v = v.data_ptr<vt>() + b * bs.v + e0;
        r.x = x.data_ptr<lt>() + b * bs.x + e0;
        r.prev = prev.data_ptr<lt>() + b * bs.prev + e0;
        r.ref = ref.has_value() ? ref->data_ptr<vt>() + b * bs.ref + e0 : nullptr;
        r.old = row_in(old_log_prob, b * old_stride + e0);
        r.amap = row_in(advantage_map, b * map_stride + e0);
        r.grad_v = write_grad ? grad_v.data_ptr<vt>() + base : nullptr;
        r.cx = cf[b * 5], r.cv = cf[b * 5 + 1], r.alpha = cf[b * 5 + 2], r.gamma = cf[b * 5 + 3];
        r.a_b = surrogate::clamp_adv(k, adv[b]);
        r.lp_scale = Acc(-2) * r.alpha * r.cv;                 // d logp / d v = lp_scale * d
        r.gq2 = Acc(2) * surrogate::kl_grad(k, kw ? kw[b] : Acc(0));
        surrogate::Sums s;
        double rsq = 0.0;
        elem_loss_rows(k, ref_mode, write_grad, r, n, s, rsq);
        part[t] = s;
        part_ref[t] = rsq;
      }
    });
    surrogate::Sums total;
    for (const auto& s : part) {
      total.add_policy(s.policy, s.delta_sq, s.clipped, s.ratio);
    }
    for (int64_t b = 0; b < B; ++b) {
      double rs = 0.0;
      for (int64_t c = 0; c < nchunk; ++c) rs += part_ref[b * nchunk + c];
      surrogate::kl_term(k, static_cast<Acc>(rs), kw ? kw[b] : Acc(0), total);
    }
    surrogate::finish(k, total, B * N, B, loss.data_ptr<Acc>(), metrics.data_ptr<Acc>());
  });
  return {loss, metrics, grad_v};
}

}  // namespace
}  // namespace tbk

TORCH_LIBRARY_IMPL(tbkernels, CPU, m) {
  m.impl("flow_step_forward", &tbk::flow_step_forward_cpu);
  m.impl("flow_step_backward", &tbk::flow_step_backward_cpu);
  m.impl("flow_grpo_surrogate", &tbk::flow_grpo_surrogate_cpu);
  m.impl("flow_grpo_map_surrogate", &tbk::flow_grpo_map_surrogate_cpu);
  m.impl("flow_grpo_elem_loss", &tbk::flow_grpo_elem_loss_cpu);
}
