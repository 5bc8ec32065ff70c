// Group-normalized advantages, CUDA kernels (contract and math:
// python/tbkernels/ops/_group_advantages_reference.py; API: group_advantages_kernels.h).
//
// Rewards are small (B x K scalars), so for the common case (contiguous groups, B up to ~65k)
// the cost is launch latency, not bandwidth: everything is done in ONE launch, global-std mode
// included. Larger problems split into a few grid-wide launches so that no block ever has to
// wait for another. Launch structure per case (see make_plan):
//
//   contiguous, group_size <= kTeamMaxRows
//     group / none             1 launch   fused_kernel, a team of W <= 32 lanes per (group, head)
//     global, B*K <= 64Ki      1 launch   fused_kernel, each block first computes the global
//       and K <= 512                      per-head std itself (redundantly, from L2)
//     global, larger           3 launches global partials -> global combine -> fused_kernel
//   contiguous, group_size > kTeamMaxRows
//     B*K <= 64Ki, K <= 512    1 launch   fused_kernel, one block per group (+ global in-block)
//     larger                   3 launches chunk partials -> per-group (+ global) combine ->
//                                         elementwise advantages; a group of any size (one
//                                         group of 1e6 rows included) is split over many blocks
//   group_index (arbitrary ids)
//     4 launches (+2 for global): init accumulators -> sum/count/min/max atomics ->
//     squared-deviation atomics -> statistics and advantages.
//
// Numerics: always two-pass (mean, then the sum of squared deviations about it), so a large
// common offset in the rewards does not cancel; partial results of chunks are merged with the
// exact identity M2 = sum_j M2_j + sum_j n_j (mean_j - mean)^2 (the two-pass formula applied to
// chunk means), never sum/sum-of-squares. Accumulation is in double for float32 and float64
// rewards and in float for float16/bfloat16: the tests bound the error by that of eager PyTorch
// in the input dtype plus one output ulp, and double makes float32 results correctly rounded
// for the price of a few FP64 ops per element in a latency/bandwidth-bound kernel. Small float64
// groups are summed in row order (team_sum_row_order) so they match the reference exactly.
// With a float accumulator (16-bit rewards) the two-pass is the corrected one (AccOps::
// kCompensate): the advantage subtracts mean1 = fl(sum / n) and then the correction
// c = sum(r - mean1) / n, so the rounding of the mean does not bias a whole group.
//
// Workspace (bytes, every piece rounded up to 256; a = 8 for float32/float64, 4 for
// float16/bfloat16): 0 for the one-launch paths; global partials path (contiguous, global, large)
// and indexed+global add (K + 2*P*K)*a, P = number of row-range partials <= 1024; chunked path
// adds K*a (global only) + (4*C + 2*G)*K*a + G*K, C = G * ceil(group_size / rows_per_chunk)
// chunks; indexed path adds 4*G*K*a. With a float accumulator (kCompensate) the partials carry
// their mean corrections: + P*K*a (global partials), + (C + G)*K*a (chunked), + G*K*a (indexed).
#include "group_advantages_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tbk {
namespace cuda {
namespace {

// Block size of every kernel that uses block reductions. Kernels declare
// __launch_bounds__(kThreads, 1): that lets the fused kernels keep their double accumulators and
// cached rewards in registers (no local-memory spills, up to 128 registers); the bandwidth-bound
// chunk, accumulation and elementwise kernels need under 64, so their occupancy is unaffected.
constexpr int kThreads = 512;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// A team keeps up to kCache rewards per lane in registers, so small groups read global memory
// once instead of three times (sum, squared deviations, advantages).
constexpr int kCache = 4;
// Largest group a warp-sized team handles; beyond it a group is reduced by a block or by many
// blocks, so one lane never walks more than 32 rows per pass.
constexpr int64_t kTeamMaxRows = 1024;
// Problems up to this many elements are done in one launch even in global-std mode, where every
// block recomputes the global statistics: reading 64Ki rewards twice from L2 per block is cheaper
// than two more launches.
constexpr int64_t kFusedMaxElems = 65536;
// In that mode the grid is kept small (one block per kGlobalElemsPerBlock elements, at most
// kGlobalFusedMaxBlocks) because each extra block repeats the global reduction.
constexpr int64_t kGlobalElemsPerBlock = 4096;
constexpr int64_t kGlobalFusedMaxBlocks = 16;
// Elements per partial-statistics chunk in the multi-launch paths: enough work per block to
// hide the block-reduction cost, small enough to spread one huge group over the whole GPU.
constexpr int64_t kChunkElems = 8192;
// Cap on global-statistics partials, so the combine step stays one short warp loop per head.
constexpr int64_t kMaxGlobalPartials = 1024;
// Grid cap for grid-stride kernels (far more threads than any GPU holds at once).
constexpr int64_t kMaxGrid = 8192;

// ------------------------------------------------------------------------------------------
// Element and accumulator types.

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = double;
  using Stat = float;
  static constexpr bool kRowOrder = false;
  __device__ static __forceinline__ double load(const float* p, int64_t i) { return p[i]; }
  __device__ static __forceinline__ float store(double v) { return static_cast<float>(v); }
};
template <>
struct Elem<double> {
  using Acc = double;
  using Stat = double;
  static constexpr bool kRowOrder = true;
  __device__ static __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
  __device__ static __forceinline__ double store(double v) { return v; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  using Stat = float;
  static constexpr bool kRowOrder = false;
  __device__ static __forceinline__ float load(const __half* p, int64_t i) {
    return __half2float(p[i]);
  }
  __device__ static __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  using Stat = float;
  static constexpr bool kRowOrder = false;
  __device__ static __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
  }
  __device__ static __forceinline__ __nv_bfloat16 store(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename Acc>
struct AccOps;
// kCompensate: the corrected two-pass. Pass 1's mean1 = fl(sum / n) is rounded to Acc (and,
// from atomics or merged chunk means, may be off by more); subtracting it as it is shifts every
// advantage of the group by (mean1 - mean) / std. For a float accumulator (16-bit rewards) that
// is up to half a float ulp of the rewards' offset: a visible fraction of a half-precision
// output ulp when the group's spread is a few ulps of its offset (fp16 rewards 1000 +- 0.5:
// 20-30% of the advantages one ulp off the correctly rounded value). So d = r - mean1 (exact
// within a factor 2 of mean1, Sterbenz), c = sum(d) / n; the advantage uses d - c, the squared
// deviations are taken about mean1 + c, and mean1 + c is the reported mean. A double
// accumulator's rounding (2^-53 of the offset) is far below anything float32 output can show
// (float32 rewards that differ at all differ by 2^-24 of their offset), and float64 rewards keep
// the reference's plain two-pass, bit for bit for small groups: double compiles it out (c = 0).
template <>
struct AccOps<float> {
  static constexpr bool kCompensate = true;
  // Order-preserving unsigned image of a float, so group min/max can use integer atomics.
  using Key = unsigned int;
  __device__ static __forceinline__ float inf() { return __int_as_float(0x7f800000); }
  __device__ static __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
  __device__ static __forceinline__ bool finite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
  }
  __device__ static __forceinline__ float sqrt_(float v) { return sqrtf(v); }
  __device__ static __forceinline__ Key encode(float v) {
    const unsigned u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  __device__ static __forceinline__ float decode(Key k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};
template <>
struct AccOps<double> {
  static constexpr bool kCompensate = false;
  using Key = unsigned long long;
  __device__ static __forceinline__ double inf() {
    return __longlong_as_double(0x7ff0000000000000LL);
  }
  __device__ static __forceinline__ double nan() {
    return __longlong_as_double(0x7ff8000000000000LL);
  }
  __device__ static __forceinline__ bool finite(double v) {
    return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) !=
           0x7ff0000000000000ull;
  }
  __device__ static __forceinline__ double sqrt_(double v) { return sqrt(v); }
  __device__ static __forceinline__ Key encode(double v) {
    const Key u = static_cast<Key>(__double_as_longlong(v));
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  }
  __device__ static __forceinline__ double decode(Key k) {
    const Key u = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
    return __longlong_as_double(static_cast<long long>(u));
  }
};

// min/max that propagate NaN like torch's amin/amax, so a group holding a NaN is never "flat".
template <typename Acc>
__device__ __forceinline__ Acc nan_min(Acc a, Acc b) {
  return (b < a || b != b) ? b : a;
}
template <typename Acc>
__device__ __forceinline__ Acc nan_max(Acc a, Acc b) {
  return (b > a || b != b) ? b : a;
}

// d*d rounded on its own, never contracted into an FMA with the running sum: the reference
// squares elementwise, then adds.
__device__ __forceinline__ float square_rn(float d) { return __fmul_rn(d, d); }
__device__ __forceinline__ double square_rn(double d) { return __dmul_rn(d, d); }

__device__ __forceinline__ void note_bad(int64_t* first_bad, int64_t idx) {
  atomicMin(reinterpret_cast<long long*>(first_bad), static_cast<long long>(idx));
}

// ------------------------------------------------------------------------------------------
// Shared math of every path.

template <typename Acc>
__device__ __forceinline__ Acc std_from_m2(Acc m2, int64_t n, int ddof) {
  const int64_t dof = n - ddof;
  return dof > 0 ? AccOps<Acc>::sqrt_(m2 / static_cast<Acc>(dof)) : Acc(0);
}

// `den` is unused in std_mode "none" (no division at all, as in the reference). The group mean is
// mean1 + c (pass-1 mean, then its correction; c = 0 without kCompensate): subtracting the two
// one after the other keeps mean1's rounding out of the advantage (v - mean1 is exact for v
// within a factor 2 of mean1).
template <typename Acc>
__device__ __forceinline__ Acc advantage(Acc v, Acc mean1, Acc c, Acc den, bool flat, int mode,
                                         Acc clip) {
  if (flat) return Acc(0);  // exact 0, and no 0/0 when eps == 0
  Acc a = (v - mean1) - c;
  if (mode != kStdNone) a = a / den;
  if (clip > Acc(0)) a = a < -clip ? -clip : (a > clip ? clip : a);  // keeps NaN, like clamp
  return a;
}

// max(m2, 0) keeping NaN: sum(d^2) - sum(d)^2 / n may round below 0 when every d is equal.
template <typename Acc>
__device__ __forceinline__ Acc nonneg(Acc m2) {
  return m2 < Acc(0) ? Acc(0) : m2;
}

template <typename Acc>
__device__ __forceinline__ Acc denominator(int mode, Acc group_std, Acc eps, Acc global_den) {
  return mode == kStdGroup ? group_std + eps : (mode == kStdGlobal ? global_den : Acc(1));
}

// ------------------------------------------------------------------------------------------
// Kernel parameters (one struct for all kernels of a dtype; unused fields are null/0).

template <typename T>
struct Params {
  using Acc = typename Elem<T>::Acc;
  using Stat = typename Elem<T>::Stat;
  using Key = typename AccOps<Acc>::Key;
  const T* x;
  T* adv;
  Stat* mean;
  Stat* sd;
  int64_t* count;
  int64_t* first_bad;
  const int64_t* gi;
  int64_t B, K, G, S;
  int mode, ddof;
  Acc eps, clip;
  Acc* gden;  // [K] global std + eps, when computed by separate launches
  // Partial statistics of row chunks: segment s (a group, or all rows) is split into pnc chunks
  // of pC rows (the last may be shorter); chunk c = s * pnc + j, entry [c * K + k].
  Acc* pmean;
  Acc* pm2;
  Acc* pmin;
  Acc* pmax;
  Acc* plo;  // kCompensate: each chunk's mean correction (its mean is pmean + plo)
  int64_t pS, pC, pnc, pn;
  // Chunked path, [G * K]: merged group statistics kept in Acc precision for the advantage
  // kernel (the outputs may be float while Acc is double).
  Acc* cmean;
  Acc* clo;  // kCompensate: the group mean is cmean + clo (the advantage subtracts both)
  Acc* csd;
  unsigned char* flat;
  // group_index path accumulators, [G * K].
  Acc* isum;
  Acc* im2;
  Acc* idsum;  // kCompensate: sum of r - isum / count, the mean correction times count
  Key* imin;
  Key* imax;
};

// ------------------------------------------------------------------------------------------
// Block reduction of per-head statistics.
//
// A "tile" of KT <= blockDim heads is laid out so thread t always handles head t % KT and rows
// t / KT, t / KT + R, ... (R = blockDim / KT): consecutive threads then read consecutive
// addresses whatever K is, and every thread's partial belongs to one head, so the reduction is a
// fixed, deterministic tree over the R "rows" of threads.

template <typename Acc>
struct Scratch {
  Acc r0[kThreads], r1[kThreads], r2[kThreads];
  Acc mean[kThreads], m2[kThreads], mn[kThreads], mx[kThreads];
  // kCompensate: mean correction (mean = mean + corr). Sized 1 otherwise, so that the double
  // kernels' shared memory (and their occupancy) does not grow.
  Acc corr[AccOps<Acc>::kCompensate ? kThreads : 1];
};

// Sums a over the rows of threads; with kMinMax also min of b and max of c, with kSum2 also the
// sum of b (results in sm.r0 / r1 / r2 [0, KT)).
template <typename Acc, bool kMinMax, bool kSum2 = false>
__device__ void reduce_rows(Acc a, Acc b, Acc c, int KT, Scratch<Acc>& sm) {
  static_assert(!(kMinMax && kSum2), "b is either a minimum or a sum");
  const int t = threadIdx.x;
  const int nt = blockDim.x;
  int rows;
  if (kWarp % KT == 0) {
    // Heads repeat every KT lanes, so the first steps stay in registers (shuffles).
    for (int off = kWarp / 2; off >= KT; off >>= 1) {
      a += __shfl_xor_sync(kFullMask, a, off);
      if (kMinMax) {
        b = nan_min(b, __shfl_xor_sync(kFullMask, b, off));
        c = nan_max(c, __shfl_xor_sync(kFullMask, c, off));
      }
      if (kSum2) b += __shfl_xor_sync(kFullMask, b, off);
    }
    const int lane = t & (kWarp - 1);
    if (lane < KT) {
      const int w = t / kWarp;
      sm.r0[w * KT + lane] = a;
      if (kMinMax || kSum2) sm.r1[w * KT + lane] = b;
      if (kMinMax) sm.r2[w * KT + lane] = c;
    }
    rows = nt / kWarp;
  } else {
    sm.r0[t] = a;
    if (kMinMax || kSum2) sm.r1[t] = b;
    if (kMinMax) sm.r2[t] = c;
    rows = nt / KT;
  }
  __syncthreads();
  for (int m = rows; m > 1;) {
    const int h = (m + 1) / 2;
    if (t < (m - h) * KT) {
      sm.r0[t] += sm.r0[t + h * KT];
      if (kMinMax) {
        sm.r1[t] = nan_min(sm.r1[t], sm.r1[t + h * KT]);
        sm.r2[t] = nan_max(sm.r2[t], sm.r2[t + h * KT]);
      }
      if (kSum2) sm.r1[t] += sm.r1[t + h * KT];
    }
    __syncthreads();
    m = h;
  }
}

// Two-pass statistics of heads [k0, k0 + KT) over rows [row0, row0 + n) (n >= 1), by the whole
// block. On return (after a barrier) sm.mean/m2 (and mn/mx, and with kCompensate corr) [0, KT)
// hold the results: the mean is sm.mean + sm.corr, m2 the squared deviations about it.
template <typename T, bool kMinMax>
__device__ void block_tile_stats(const T* x, int64_t row0, int64_t n, int64_t K, int64_t k0,
                                 int KT, int64_t* first_bad,
                                 Scratch<typename Elem<T>::Acc>& sm) {
  using Acc = typename Elem<T>::Acc;
  const int t = threadIdx.x;
  const int R = static_cast<int>(blockDim.x) / KT;
  const bool active = t < R * KT;
  const int r = t / KT;
  const int kk = t - r * KT;
  const int64_t col = k0 + kk;

  Acc s = 0, mn = AccOps<Acc>::inf(), mx = -AccOps<Acc>::inf();
  if (active) {
    for (int64_t i = r; i < n; i += R) {
      const int64_t idx = (row0 + i) * K + col;
      const Acc v = Elem<T>::load(x, idx);
      if (first_bad != nullptr && !AccOps<Acc>::finite(v)) note_bad(first_bad, idx);
      s += v;
      if (kMinMax) {
        mn = nan_min(mn, v);
        mx = nan_max(mx, v);
      }
    }
  }
  reduce_rows<Acc, kMinMax>(s, mn, mx, KT, sm);
  if (t < KT) {
    sm.mean[t] = sm.r0[t] / static_cast<Acc>(n);
    if (kMinMax) {
      sm.mn[t] = sm.r1[t];
      sm.mx[t] = sm.r2[t];
    }
  }
  __syncthreads();

  constexpr bool kComp = AccOps<Acc>::kCompensate;
  Acc q = 0, sd = 0;
  if (active) {
    const Acc m = sm.mean[kk];
    for (int64_t i = r; i < n; i += R) {
      const Acc d = Elem<T>::load(x, (row0 + i) * K + col) - m;
      q += square_rn(d);
      if (kComp) sd += d;
    }
  }
  reduce_rows<Acc, false, kComp>(q, sd, Acc(0), KT, sm);
  if (t < KT) {
    if (kComp) {
      // Corrected two-pass in this one memory pass: c = sum(d) / n, and the squared deviations
      // about mean1 + c are sum(d^2) - sum(d)^2 / n (c is tiny next to the spread, so nothing
      // cancels).
      const Acc dsum = sm.r1[t];
      sm.corr[t] = dsum / static_cast<Acc>(n);
      sm.m2[t] = nonneg(sm.r0[t] - dsum * dsum / static_cast<Acc>(n));
    } else {
      sm.m2[t] = sm.r0[t];
    }
  }
  __syncthreads();
}

// The mean correction of head t of the last block_tile_stats (0 without kCompensate).
template <typename Acc>
__device__ __forceinline__ Acc block_corr(const Scratch<Acc>& sm, int t) {
  if constexpr (AccOps<Acc>::kCompensate) {
    return sm.corr[t];
  } else {
    return Acc(0);
  }
}

// ------------------------------------------------------------------------------------------
// Team (sub-warp) reductions: a team is W aligned lanes, so xor shuffles with offset < W stay in
// it, and every lane ends with the same bits (each butterfly step adds the same two operands).

template <int W, typename Acc>
__device__ __forceinline__ Acc team_sum(Acc v) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
template <int W, typename Acc>
__device__ __forceinline__ Acc team_min(Acc v) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) v = nan_min(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
template <int W, typename Acc>
__device__ __forceinline__ Acc team_max(Acc v) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum of a team's cached values in row order (row j * W + l is v[j] of team lane l): the
// reference's sequential order, so float64 results of small groups match it bit for bit
// instead of differing by an ulp, which its float64 tests would see.
template <int W, typename Acc>
__device__ __forceinline__ Acc team_sum_row_order(const Acc (&v)[kCache], int64_t S, int lane0) {
  Acc s = 0;
#pragma unroll
  for (int j = 0; j < kCache; ++j) {
#pragma unroll
    for (int l = 0; l < W; ++l) {
      const Acc x = __shfl_sync(kFullMask, v[j], lane0 + l);
      if (static_cast<int64_t>(j) * W + l < S) s += x;
    }
  }
  return s;
}

// Contiguous groups, one team of W lanes per (group, head) task. Every lane of a warp runs the
// same number of loop iterations (tasks past the end are computed as empty), because the
// shuffles name the full warp.
template <typename T, int W>
__device__ void team_groups(const Params<T>& p, const typename Elem<T>::Acc* gden) {
  using Acc = typename Elem<T>::Acc;
  constexpr int kTeams = kWarp / W;
  const int lane = threadIdx.x & (kWarp - 1);
  const int tl = lane & (W - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t ntasks = p.G * p.K;
  const int64_t S = p.S, K = p.K;
  const bool cached = S <= static_cast<int64_t>(kCache) * W;

  for (int64_t base = warp * kTeams; base < ntasks; base += nwarps * kTeams) {
    const int64_t task = base + lane / W;
    const bool valid = task < ntasks;
    const int64_t g = valid ? task / K : 0;
    const int64_t k = valid ? task - g * K : 0;
    const int64_t e0 = g * S * K + k;  // flat index of member 0; member i is at e0 + i * K

    Acc s = 0, mn = AccOps<Acc>::inf(), mx = -AccOps<Acc>::inf();
    Acc v[kCache];
    if (cached) {
#pragma unroll
      for (int j = 0; j < kCache; ++j) {
        const int64_t i = tl + static_cast<int64_t>(j) * W;
        v[j] = 0;
        if (valid && i < S) {
          const int64_t idx = e0 + i * K;
          v[j] = Elem<T>::load(p.x, idx);
          if (p.first_bad != nullptr && !AccOps<Acc>::finite(v[j])) note_bad(p.first_bad, idx);
          s += v[j];
          mn = nan_min(mn, v[j]);
          mx = nan_max(mx, v[j]);
        }
      }
    } else if (valid) {
      for (int64_t i = tl; i < S; i += W) {
        const int64_t idx = e0 + i * K;
        const Acc x = Elem<T>::load(p.x, idx);
        if (p.first_bad != nullptr && !AccOps<Acc>::finite(x)) note_bad(p.first_bad, idx);
        s += x;
        mn = nan_min(mn, x);
        mx = nan_max(mx, x);
      }
    }
    const int lane0 = lane & ~(W - 1);
    const bool row_order = Elem<T>::kRowOrder && cached;
    s = row_order ? team_sum_row_order<W>(v, S, lane0) : team_sum<W>(s);
    mn = team_min<W>(mn);
    mx = team_max<W>(mx);
    const Acc mean1 = s / static_cast<Acc>(S);

    // Corrected two-pass with kCompensate (see AccOps): the mean is mean1 + c; c stays 0 for a
    // double accumulator, which leaves that path's arithmetic as it was.
    constexpr bool kComp = AccOps<Acc>::kCompensate;
    Acc c = 0, q = 0, dsum = 0;
    if (cached) {
      if (kComp) {
#pragma unroll
        for (int j = 0; j < kCache; ++j) {
          const int64_t i = tl + static_cast<int64_t>(j) * W;
          if (valid && i < S) dsum += v[j] - mean1;
        }
        c = team_sum<W>(dsum) / static_cast<Acc>(S);
      }
      Acc d2[kCache];
#pragma unroll
      for (int j = 0; j < kCache; ++j) {
        const int64_t i = tl + static_cast<int64_t>(j) * W;
        d2[j] = valid && i < S ? square_rn((v[j] - mean1) - c) : Acc(0);
        q += d2[j];
      }
      if (row_order) q = team_sum_row_order<W>(d2, S, lane0);
    } else if (valid) {
      for (int64_t i = tl; i < S; i += W) {
        const Acc d = Elem<T>::load(p.x, e0 + i * K) - mean1;
        q += square_rn(d);
        if (kComp) dsum += d;
      }
    }
    if (!row_order) q = team_sum<W>(q);
    if (kComp && !cached) {
      // One memory pass for both sums: about mean1 + c the squared deviations are
      // sum(d^2) - sum(d)^2 / S (c is tiny next to the spread, so nothing cancels).
      dsum = team_sum<W>(dsum);
      c = dsum / static_cast<Acc>(S);
      q = nonneg(q - dsum * c);
    }

    if (valid) {
      const Acc sd = std_from_m2(q, S, p.ddof);
      const bool flat = mn == mx;
      const Acc den = denominator(p.mode, sd, p.eps, p.mode == kStdGlobal ? gden[k] : Acc(0));
      if (tl == 0) {
        p.mean[task] = static_cast<typename Params<T>::Stat>(kComp ? mean1 + c : mean1);
        p.sd[task] = static_cast<typename Params<T>::Stat>(sd);
        if (k == 0) p.count[g] = S;
      }
      if (cached) {
#pragma unroll
        for (int j = 0; j < kCache; ++j) {
          const int64_t i = tl + static_cast<int64_t>(j) * W;
          if (i < S)
            p.adv[e0 + i * K] =
                Elem<T>::store(advantage(v[j], mean1, c, den, flat, p.mode, p.clip));
        }
      } else {
        for (int64_t i = tl; i < S; i += W) {
          const int64_t idx = e0 + i * K;
          p.adv[idx] = Elem<T>::store(
              advantage(Elem<T>::load(p.x, idx), mean1, c, den, flat, p.mode, p.clip));
        }
      }
    }
  }
}

// Contiguous groups too large for a team (small problems only, K <= kThreads): one block per
// group, all heads at once.
template <typename T>
__device__ void block_groups(const Params<T>& p, const typename Elem<T>::Acc* gden,
                             Scratch<typename Elem<T>::Acc>& sm) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc s_den[kThreads];
  __shared__ bool s_flat[kThreads];
  const int t = threadIdx.x;
  const int KT = static_cast<int>(p.K);
  for (int64_t g = blockIdx.x; g < p.G; g += gridDim.x) {
    const int64_t row0 = g * p.S;
    block_tile_stats<T, true>(p.x, row0, p.S, p.K, 0, KT, p.first_bad, sm);
    if (t < KT) {
      const Acc sd = std_from_m2(sm.m2[t], p.S, p.ddof);
      p.mean[g * p.K + t] = static_cast<typename Params<T>::Stat>(
          AccOps<Acc>::kCompensate ? sm.mean[t] + block_corr(sm, t) : sm.mean[t]);
      p.sd[g * p.K + t] = static_cast<typename Params<T>::Stat>(sd);
      if (t == 0) p.count[g] = p.S;
      s_den[t] = denominator(p.mode, sd, p.eps, p.mode == kStdGlobal ? gden[t] : Acc(0));
      s_flat[t] = sm.mn[t] == sm.mx[t];
    }
    __syncthreads();
    const int64_t n = p.S * p.K;
    const int64_t e0 = row0 * p.K;
    for (int64_t e = t; e < n; e += blockDim.x) {
      const int k = static_cast<int>(e % p.K);
      p.adv[e0 + e] = Elem<T>::store(advantage(Elem<T>::load(p.x, e0 + e), sm.mean[k],
                                               block_corr(sm, k), s_den[k], s_flat[k], p.mode,
                                               p.clip));
    }
    __syncthreads();  // sm and s_den are rewritten by the next group
  }
}

// The single-launch kernel for contiguous groups. W > 0: teams of W lanes; W == 0: a block per
// group. global_in_block: global-std mode with K <= kThreads, each block computes the global
// per-head std itself first (no inter-block dependency, so still one launch); otherwise global
// mode reads p.gden written by the preceding launches.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads, 1) fused_kernel(Params<T> p, int global_in_block) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Scratch<Acc> sm;
  __shared__ Acc s_gden[kThreads];
  const Acc* gden = p.gden;
  if (p.mode == kStdGlobal && global_in_block) {
    const int KT = static_cast<int>(p.K);
    block_tile_stats<T, false>(p.x, 0, p.B, p.K, 0, KT, nullptr, sm);
    if (static_cast<int>(threadIdx.x) < KT)
      s_gden[threadIdx.x] = std_from_m2(sm.m2[threadIdx.x], p.B, p.ddof) + p.eps;
    __syncthreads();
    gden = s_gden;
  }
  if constexpr (W == 0) {
    block_groups<T>(p, gden, sm);
  } else {
    team_groups<T, W>(p, gden);
  }
}

// ------------------------------------------------------------------------------------------
// Multi-launch paths.

// Per-chunk two-pass statistics (see Params::pS/pC/pnc). kMinMax also records min/max and runs
// the finiteness check (the chunked path); without it these are global-std partials over row
// ranges, whose elements are checked elsewhere.
template <typename T, bool kMinMax>
__global__ void __launch_bounds__(kThreads, 1) chunk_stats_kernel(Params<T> p) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Scratch<Acc> sm;
  const int t = threadIdx.x;
  for (int64_t c = blockIdx.x; c < p.pn; c += gridDim.x) {
    const int64_t seg = c / p.pnc;
    const int64_t j = c - seg * p.pnc;
    const int64_t row0 = seg * p.pS + j * p.pC;
    const int64_t n = p.pS - j * p.pC < p.pC ? p.pS - j * p.pC : p.pC;
    for (int64_t k0 = 0; k0 < p.K; k0 += blockDim.x) {
      const int KT = static_cast<int>(p.K - k0 < blockDim.x ? p.K - k0 : blockDim.x);
      block_tile_stats<T, kMinMax>(p.x, row0, n, p.K, k0, KT, kMinMax ? p.first_bad : nullptr,
                                   sm);
      if (t < KT) {
        const int64_t o = c * p.K + k0 + t;
        p.pmean[o] = sm.mean[t];
        p.pm2[o] = sm.m2[t];
        if (AccOps<Acc>::kCompensate) p.plo[o] = block_corr(sm, t);  // chunk mean pmean + plo
        if (kMinMax) {
          p.pmin[o] = sm.mn[t];
          p.pmax[o] = sm.mx[t];
        }
      }
      __syncthreads();
    }
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Merges chunk partials, one warp per task: tasks [0, G*K) are (group, head) pairs of the
// chunked path (do_groups), tasks [G*K, G*K + K) are the global statistics of each head
// (do_global), merged over every chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(Params<T> p, int do_groups,
                                                           int do_global) {
  using Acc = typename Elem<T>::Acc;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t K = p.K;
  const int64_t group_tasks = do_groups ? (p.pn / p.pnc) * K : 0;
  const int64_t ntasks = group_tasks + (do_global ? K : 0);
  for (int64_t task = warp; task < ntasks; task += nwarps) {  // warp-uniform
    const bool is_group = task < group_tasks;
    const int64_t g = is_group ? task / K : 0;
    const int64_t k = is_group ? task - g * K : task - group_tasks;
    const int64_t c0 = is_group ? g * p.pnc : 0;
    const int64_t nc = is_group ? p.pnc : p.pn;
    const int64_t n = is_group ? p.pS : (p.pn / p.pnc) * p.pS;

    Acc s = 0, mn = AccOps<Acc>::inf(), mx = -AccOps<Acc>::inf();
    for (int64_t j = lane; j < nc; j += kWarp) {
      const int64_t c = c0 + j;
      const int64_t jj = c % p.pnc;
      const int64_t nj = p.pS - jj * p.pC < p.pC ? p.pS - jj * p.pC : p.pC;
      s += static_cast<Acc>(nj) * p.pmean[c * K + k];
      if (is_group) {
        mn = nan_min(mn, p.pmin[c * K + k]);
        mx = nan_max(mx, p.pmax[c * K + k]);
      }
    }
    s = warp_sum(s);
    const Acc mean1 = s / static_cast<Acc>(n);
    // Corrected two-pass over the chunk means (kCompensate, see AccOps): mean1 is rounded, and
    // each chunk mean is itself pmean + plo, so the group mean is mean1 + corr with
    // corr = sum_j n_j e_j / n, e_j = (pmean_j - mean1) + plo_j (the difference exact by Sterbenz).
    constexpr bool kComp = AccOps<Acc>::kCompensate;
    Acc corr = 0;
    if (kComp) {
      Acc se = 0;
      for (int64_t j = lane; j < nc; j += kWarp) {
        const int64_t c = c0 + j;
        const int64_t jj = c % p.pnc;
        const int64_t nj = p.pS - jj * p.pC < p.pC ? p.pS - jj * p.pC : p.pC;
        se += static_cast<Acc>(nj) * ((p.pmean[c * K + k] - mean1) + p.plo[c * K + k]);
      }
      corr = warp_sum(se) / static_cast<Acc>(n);
    }
    Acc q = 0;
    for (int64_t j = lane; j < nc; j += kWarp) {
      const int64_t c = c0 + j;
      const int64_t jj = c % p.pnc;
      const int64_t nj = p.pS - jj * p.pC < p.pC ? p.pS - jj * p.pC : p.pC;
      Acc e = p.pmean[c * K + k] - mean1;      // chunk mean - group mean
      if (kComp) e = (e + p.plo[c * K + k]) - corr;
      q += p.pm2[c * K + k] + static_cast<Acc>(nj) * square_rn(e);
    }
    q = warp_sum(q);
    if (is_group) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        mn = nan_min(mn, __shfl_xor_sync(kFullMask, mn, off));
        mx = nan_max(mx, __shfl_xor_sync(kFullMask, mx, off));
      }
    }
    if (lane == 0) {
      if (is_group) {
        const Acc sd = std_from_m2(q, n, p.ddof);
        p.mean[task] = static_cast<typename Params<T>::Stat>(kComp ? mean1 + corr : mean1);
        p.sd[task] = static_cast<typename Params<T>::Stat>(sd);
        // The advantage kernel subtracts mean1, then corr (advantage()), so the group mean
        // reaches it unrounded as the pair (cmean, clo).
        p.cmean[task] = mean1;
        if (kComp) p.clo[task] = corr;
        p.csd[task] = sd;
        p.flat[task] = mn == mx;
        if (k == 0) p.count[g] = n;
      } else {
        p.gden[k] = std_from_m2(q, n, p.ddof) + p.eps;
      }
    }
  }
}

// Chunked path, last step: elementwise advantages from the merged statistics.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) contig_adv_kernel(Params<T> p) {
  using Acc = typename Elem<T>::Acc;
  const int64_t n = p.B * p.K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t b = e / p.K;
    const int64_t k = e - b * p.K;
    const int64_t gk = (b / p.S) * p.K + k;
    const Acc den =
        denominator(p.mode, p.csd[gk], p.eps, p.mode == kStdGlobal ? p.gden[k] : Acc(0));
    const Acc lo = AccOps<Acc>::kCompensate ? p.clo[gk] : Acc(0);
    p.adv[e] = Elem<T>::store(advantage(Elem<T>::load(p.x, e), p.cmean[gk], lo, den,
                                        p.flat[gk] != 0, p.mode, p.clip));
  }
}

// ------------------------------------------------------------------------------------------
// group_index path: global-memory atomics on [G, K] accumulators.
//
// Elements are visited head-major (i = k * B + b) so that the lanes of a warp share a head and,
// when ids are sorted or clustered, a group: a segmented warp scan then merges equal
// neighbouring keys and only the last lane of each run issues the atomics. That keeps one huge
// group (all B rows in one id) from serialising B atomics on one address.

struct SegInfo {
  bool tail;  // last lane of its run of equal keys
  int len;    // run length up to and including this lane
};

// Inclusive scan of (s, mn, mx) over runs of equal `key` among the 32 lanes; full warp only.
template <typename Acc, bool kMinMax>
__device__ __forceinline__ SegInfo seg_scan(long long key, Acc& s, Acc& mn, Acc& mx) {
  const int lane = threadIdx.x & (kWarp - 1);
  const long long prev = __shfl_up_sync(kFullMask, key, 1);
  const unsigned heads = __ballot_sync(kFullMask, lane == 0 || prev != key);
  // Lane where this lane's run starts: highest run head at or below it. (2u << 31 wraps to 0.)
  const int start = 31 - __clz(heads & ((2u << lane) - 1u));
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const Acc ts = __shfl_up_sync(kFullMask, s, off);
    Acc tmn = ts, tmx = ts;
    if (kMinMax) {
      tmn = __shfl_up_sync(kFullMask, mn, off);
      tmx = __shfl_up_sync(kFullMask, mx, off);
    }
    if (lane - off >= start) {
      s += ts;
      if (kMinMax) {
        mn = nan_min(mn, tmn);
        mx = nan_max(mx, tmx);
      }
    }
  }
  SegInfo info;
  info.tail = lane == kWarp - 1 || ((heads >> (lane + 1)) & 1u);
  info.len = lane - start + 1;
  return info;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) idx_init_kernel(Params<T> p) {
  using Key = typename Params<T>::Key;
  const int64_t n = p.G * p.K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    p.isum[e] = 0;
    p.im2[e] = 0;
    if (AccOps<typename Elem<T>::Acc>::kCompensate) p.idsum[e] = 0;
    p.imin[e] = ~Key(0);  // encode() image of the largest value
    p.imax[e] = Key(0);
    if (e < p.G) p.count[e] = 0;
  }
}

// kPass 1: count, sum, min, max (and the finiteness check); kPass 2: squared deviations about
// the group mean, which needs pass 1 complete (hence a separate launch), and with kCompensate
// the deviations themselves (the mean correction, see AccOps).
template <typename T, int kPass>
__global__ void __launch_bounds__(kThreads, 1) idx_accumulate_kernel(Params<T> p) {
  using Acc = typename Elem<T>::Acc;
  using Ops = AccOps<Acc>;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t n = p.B * p.K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Warp-aligned start, so `base < n` is warp-uniform (the scan needs the whole warp).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x - lane;
       base < n; base += stride) {
    const int64_t i = base + lane;
    bool valid = i < n;
    const int64_t k = valid ? i / p.B : 0;
    const int64_t b = valid ? i - k * p.B : 0;
    const int64_t g = valid ? p.gi[b] : -1;
    valid = valid && g >= 0 && g < p.G;
    const int64_t idx = b * p.K + k;
    const long long key = valid ? static_cast<long long>(g * p.K + k) : -1;
    Acc v = valid ? Elem<T>::load(p.x, idx) : Acc(0);
    if (kPass == 1) {
      if (valid && p.first_bad != nullptr && !Ops::finite(v)) note_bad(p.first_bad, idx);
      Acc mn = valid ? v : Ops::inf(), mx = valid ? v : -Ops::inf();
      const SegInfo run = seg_scan<Acc, true>(key, v, mn, mx);
      if (valid && run.tail) {
        atomicAdd(p.isum + key, v);
        atomicMin(p.imin + key, Ops::encode(mn));
        atomicMax(p.imax + key, Ops::encode(mx));
        if (k == 0)
          atomicAdd(reinterpret_cast<unsigned long long*>(p.count + g),
                    static_cast<unsigned long long>(run.len));
      }
    } else {
      Acc q = 0, d = 0;
      if (valid) {
        // the same bits as idx_finish_kernel's mean1
        d = v - p.isum[key] / static_cast<Acc>(p.count[g]);
        q = square_rn(d);
      }
      Acc unused0 = 0, unused1 = 0;
      const SegInfo run = seg_scan<Acc, false>(key, q, unused0, unused1);
      if (Ops::kCompensate) seg_scan<Acc, false>(key, d, unused0, unused1);
      if (valid && run.tail) {
        atomicAdd(p.im2 + key, q);
        if (Ops::kCompensate) atomicAdd(p.idsum + key, d);
      }
    }
  }
}

// Statistics [G, K] and advantages [B, K] from the accumulators, in one grid-stride loop.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) idx_finish_kernel(Params<T> p) {
  using Acc = typename Elem<T>::Acc;
  using Ops = AccOps<Acc>;
  const int64_t nstat = p.G * p.K;
  const int64_t nadv = p.B * p.K;
  const int64_t n = nstat > nadv ? nstat : nadv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    if (e < nstat) {
      const int64_t cnt = p.count[e / p.K];
      using Stat = typename Params<T>::Stat;
      const Acc mean1 = cnt > 0 ? p.isum[e] / static_cast<Acc>(cnt) : Acc(0);
      Acc c = 0, m2 = p.im2[e];
      if (Ops::kCompensate && cnt > 0) {
        // corrected two-pass: mean1 + c, squared deviations sum(d^2) - sum(d)^2 / n about it
        c = p.idsum[e] / static_cast<Acc>(cnt);
        m2 = nonneg(m2 - p.idsum[e] * c);
      }
      p.mean[e] = static_cast<Stat>(Ops::kCompensate ? mean1 + c : mean1);
      p.sd[e] = static_cast<Stat>(std_from_m2(m2, cnt, p.ddof));
    }
    if (e < nadv) {
      const int64_t b = e / p.K;
      const int64_t k = e - b * p.K;
      const int64_t g = p.gi[b];
      if (g < 0 || g >= p.G) {
        p.adv[e] = Elem<T>::store(Ops::nan());
        continue;
      }
      const int64_t gk = g * p.K + k;
      const int64_t cnt = p.count[g];
      const Acc mean1 = p.isum[gk] / static_cast<Acc>(cnt);
      Acc c = 0, m2 = p.im2[gk];
      if (Ops::kCompensate) {  // as above (cnt >= 1: row b is in group g)
        c = p.idsum[gk] / static_cast<Acc>(cnt);
        m2 = nonneg(m2 - p.idsum[gk] * c);
      }
      const Acc sd = std_from_m2(m2, cnt, p.ddof);
      const bool flat = Ops::decode(p.imin[gk]) == Ops::decode(p.imax[gk]);
      const Acc den = denominator(p.mode, sd, p.eps, p.mode == kStdGlobal ? p.gden[k] : Acc(0));
      p.adv[e] = Elem<T>::store(
          advantage(Elem<T>::load(p.x, e), mean1, c, den, flat, p.mode, p.clip));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side: the plan (path, grid sizes, workspace layout) depends only on sizes and modes, so
// the workspace size can be asked for before any launch.

enum Path { kPathEmpty, kPathTeam, kPathBlock, kPathChunked, kPathIndexed };

struct Plan {
  bool ok = false;
  Path path = kPathEmpty;
  int W = 0;                     // team width (kPathTeam)
  bool global_in_block = false;  // global std computed inside the fused kernel
  bool global_launches = false;  // global std from row-range partials + combine (2 launches)
  int64_t fused_blocks = 0, fused_threads = 0;
  // Partial-statistics geometry (global row ranges, or chunks of groups).
  int64_t pS = 0, pC = 0, pnc = 0, pn = 0;
  bool comp = false;  // float accumulator: AccOps<float>::kCompensate buffers below are used
  // Workspace layout (byte offsets) and size.
  size_t off_gden = 0, off_pmean = 0, off_pm2 = 0, off_pmin = 0, off_pmax = 0, off_plo = 0;
  size_t off_cmean = 0, off_clo = 0, off_csd = 0, off_flat = 0;
  size_t off_isum = 0, off_im2 = 0, off_idsum = 0, off_imin = 0, off_imax = 0, bytes = 0;
  int launches = 0;
};

constexpr size_t kAlign = 256;

size_t take(size_t& cursor, size_t bytes) {
  const size_t off = cursor;
  cursor += (bytes + kAlign - 1) / kAlign * kAlign;
  return off;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

Plan make_plan(const GroupAdvantagesArgs& a) {
  Plan pl;
  const int64_t B = a.batch, K = a.heads, G = a.num_groups;
  const bool indexed = a.group_index != nullptr;
  if (B < 0 || K < 1 || G < 0 || a.std_mode < kStdGroup || a.std_mode > kStdNone ||
      a.ddof < 0 || a.ddof > 1)
    return pl;
  if (!indexed && (a.group_size < 1 || B % a.group_size != 0 || G != B / a.group_size)) return pl;
  if (indexed && B > 0 && G < 1) return pl;
  switch (a.dtype) {
    case DType::kFloat32: case DType::kFloat64: case DType::kFloat16: case DType::kBFloat16:
      break;
    default:
      return pl;
  }
  pl.ok = true;
  const size_t acc =
      a.dtype == DType::kFloat64 || a.dtype == DType::kFloat32 ? sizeof(double) : sizeof(float);
  pl.comp = acc == sizeof(float) ? AccOps<float>::kCompensate : AccOps<double>::kCompensate;
  const bool global = a.std_mode == kStdGlobal;
  const int64_t N = B * K;
  size_t cur = 0;

  auto plan_global_partials = [&]() {
    // Row ranges of ~kChunkElems elements, at most kMaxGlobalPartials of them.
    int64_t rows = clamp64(kChunkElems / K, 1, B);
    if (ceil_div(B, rows) > kMaxGlobalPartials) rows = ceil_div(B, kMaxGlobalPartials);
    pl.pS = B;
    pl.pC = rows;
    pl.pnc = ceil_div(B, rows);
    pl.pn = pl.pnc;
    pl.global_launches = true;
    pl.off_gden = take(cur, K * acc);
    pl.off_pmean = take(cur, pl.pn * K * acc);
    pl.off_pm2 = take(cur, pl.pn * K * acc);
    if (pl.comp) pl.off_plo = take(cur, pl.pn * K * acc);
  };

  if (indexed) {
    if (G == 0) {  // then B == 0 too: nothing to write
      pl.path = kPathEmpty;
      return pl;
    }
    pl.path = kPathIndexed;
    pl.launches = 2;  // init, finish
    if (B > 0) {
      pl.launches += 2;  // the two accumulation passes
      if (global) {
        plan_global_partials();
        pl.launches += 2;
      }
    }
    pl.off_isum = take(cur, G * K * acc);
    pl.off_im2 = take(cur, G * K * acc);
    if (pl.comp) pl.off_idsum = take(cur, G * K * acc);
    pl.off_imin = take(cur, G * K * acc);  // Key has the size of Acc
    pl.off_imax = take(cur, G * K * acc);
    pl.bytes = cur;
    return pl;
  }

  if (B == 0) {
    pl.path = kPathEmpty;
    return pl;
  }
  const int64_t S = a.group_size;
  const bool small = N <= kFusedMaxElems && K <= kThreads;
  const int64_t global_blocks = clamp64(N / kGlobalElemsPerBlock, 1, kGlobalFusedMaxBlocks);

  if (S <= kTeamMaxRows) {
    pl.path = kPathTeam;
    int w = 1;
    const int64_t need = ceil_div(S, kCache);
    while (w < need && w < kWarp) w <<= 1;
    pl.W = w;
    const int64_t warps = ceil_div(G * K, kWarp / w);
    pl.launches = 1;
    if (global && small) {
      pl.global_in_block = true;
      pl.fused_threads = kThreads;  // all of them for the in-block global reduction
      pl.fused_blocks = clamp64(ceil_div(warps * kWarp, kThreads), 1, global_blocks);
    } else {
      pl.fused_threads = warps * kWarp < kThreads ? warps * kWarp : kThreads;
      pl.fused_blocks = clamp64(ceil_div(warps * kWarp, pl.fused_threads), 1, kMaxGrid);
      if (global) {
        plan_global_partials();
        pl.launches += 2;
      }
    }
  } else if (small) {
    pl.path = kPathBlock;
    pl.global_in_block = global;
    pl.fused_threads = kThreads;
    pl.fused_blocks = clamp64(G, 1, global ? global_blocks : kMaxGrid);
    pl.launches = 1;
  } else {
    pl.path = kPathChunked;
    const int64_t rows = clamp64(kChunkElems / K, 1, S);
    pl.pS = S;
    pl.pC = rows;
    pl.pnc = ceil_div(S, rows);
    pl.pn = G * pl.pnc;
    if (global) pl.off_gden = take(cur, K * acc);
    pl.off_pmean = take(cur, pl.pn * K * acc);
    pl.off_pm2 = take(cur, pl.pn * K * acc);
    pl.off_pmin = take(cur, pl.pn * K * acc);
    pl.off_pmax = take(cur, pl.pn * K * acc);
    if (pl.comp) pl.off_plo = take(cur, pl.pn * K * acc);
    pl.off_cmean = take(cur, G * K * acc);
    if (pl.comp) pl.off_clo = take(cur, G * K * acc);
    pl.off_csd = take(cur, G * K * acc);
    pl.off_flat = take(cur, G * K);
    pl.launches = 3;
  }
  pl.bytes = cur;
  return pl;
}

template <typename T>
Params<T> make_params(const GroupAdvantagesArgs& a, const Plan& pl) {
  using Acc = typename Elem<T>::Acc;
  using Key = typename AccOps<Acc>::Key;
  char* ws = static_cast<char*>(a.workspace);
  auto at = [&](size_t off) { return ws + off; };
  Params<T> p{};
  p.x = static_cast<const T*>(a.rewards);
  p.adv = static_cast<T*>(a.adv);
  p.mean = static_cast<typename Params<T>::Stat*>(a.mean);
  p.sd = static_cast<typename Params<T>::Stat*>(a.std_out);
  p.count = a.count;
  p.first_bad = a.first_bad;
  p.gi = a.group_index;
  p.B = a.batch;
  p.K = a.heads;
  p.G = a.num_groups;
  p.S = a.group_index != nullptr ? 0 : a.group_size;
  p.mode = a.std_mode;
  p.ddof = a.ddof;
  p.eps = static_cast<Acc>(a.eps);
  p.clip = static_cast<Acc>(a.clip);
  p.pS = pl.pS;
  p.pC = pl.pC;
  p.pnc = pl.pnc;
  p.pn = pl.pn;
  if (pl.bytes > 0) {
    const bool gden = (pl.global_launches || pl.path == kPathChunked) && a.std_mode == kStdGlobal;
    p.gden = gden ? reinterpret_cast<Acc*>(at(pl.off_gden)) : nullptr;
    if (pl.global_launches || pl.path == kPathChunked) {
      p.pmean = reinterpret_cast<Acc*>(at(pl.off_pmean));
      p.pm2 = reinterpret_cast<Acc*>(at(pl.off_pm2));
      if (pl.comp) p.plo = reinterpret_cast<Acc*>(at(pl.off_plo));
    }
    if (pl.path == kPathChunked) {
      p.pmin = reinterpret_cast<Acc*>(at(pl.off_pmin));
      p.pmax = reinterpret_cast<Acc*>(at(pl.off_pmax));
      p.cmean = reinterpret_cast<Acc*>(at(pl.off_cmean));
      if (pl.comp) p.clo = reinterpret_cast<Acc*>(at(pl.off_clo));
      p.csd = reinterpret_cast<Acc*>(at(pl.off_csd));
      p.flat = reinterpret_cast<unsigned char*>(at(pl.off_flat));
    }
    if (pl.path == kPathIndexed) {
      p.isum = reinterpret_cast<Acc*>(at(pl.off_isum));
      p.im2 = reinterpret_cast<Acc*>(at(pl.off_im2));
      if (pl.comp) p.idsum = reinterpret_cast<Acc*>(at(pl.off_idsum));
      p.imin = reinterpret_cast<Key*>(at(pl.off_imin));
      p.imax = reinterpret_cast<Key*>(at(pl.off_imax));
    }
  }
  return p;
}

unsigned grid_for(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned>(clamp64(ceil_div(work_items, per_block), 1, kMaxGrid));
}

// Global per-head std from row-range partials: 2 launches, writes p.gden.
template <typename T>
cudaError_t launch_global_partials(const Params<T>& p, cudaStream_t stream) {
  chunk_stats_kernel<T, false><<<grid_for(p.pn, 1), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t threads = p.K * kWarp < kThreads ? p.K * kWarp : kThreads;
  combine_kernel<T><<<grid_for(p.K * kWarp, threads), static_cast<unsigned>(threads), 0,
                      stream>>>(p, 0, 1);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fused(const Params<T>& p, const Plan& pl, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(pl.fused_blocks));
  const dim3 block(static_cast<unsigned>(pl.fused_threads));
  const int gib = pl.global_in_block ? 1 : 0;
  switch (pl.path == kPathBlock ? 0 : pl.W) {
    case 0: fused_kernel<T, 0><<<grid, block, 0, stream>>>(p, gib); break;
    case 1: fused_kernel<T, 1><<<grid, block, 0, stream>>>(p, gib); break;
    case 2: fused_kernel<T, 2><<<grid, block, 0, stream>>>(p, gib); break;
    case 4: fused_kernel<T, 4><<<grid, block, 0, stream>>>(p, gib); break;
    case 8: fused_kernel<T, 8><<<grid, block, 0, stream>>>(p, gib); break;
    case 16: fused_kernel<T, 16><<<grid, block, 0, stream>>>(p, gib); break;
    case 32: fused_kernel<T, 32><<<grid, block, 0, stream>>>(p, gib); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const GroupAdvantagesArgs& a, const Plan& pl, cudaStream_t stream) {
  const Params<T> p = make_params<T>(a, pl);
  cudaError_t err = cudaSuccess;
  switch (pl.path) {
    case kPathEmpty:
      return cudaSuccess;
    case kPathTeam:
    case kPathBlock:
      if (pl.global_launches) {
        err = launch_global_partials<T>(p, stream);
        if (err != cudaSuccess) return err;
      }
      return launch_fused<T>(p, pl, stream);
    case kPathChunked: {
      chunk_stats_kernel<T, true><<<grid_for(p.pn, 1), kThreads, 0, stream>>>(p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      const int do_global = a.std_mode == kStdGlobal ? 1 : 0;
      const int64_t tasks = p.G * p.K + (do_global ? p.K : 0);
      combine_kernel<T><<<grid_for(tasks * kWarp, kThreads), kThreads, 0, stream>>>(p, 1,
                                                                                    do_global);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      contig_adv_kernel<T><<<grid_for(p.B * p.K, 4 * kThreads), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
    case kPathIndexed: {
      idx_init_kernel<T><<<grid_for(p.G * p.K, kThreads), kThreads, 0, stream>>>(p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      if (p.B > 0) {
        if (pl.global_launches) {
          err = launch_global_partials<T>(p, stream);
          if (err != cudaSuccess) return err;
        }
        const unsigned grid = grid_for(p.B * p.K, kThreads);
        idx_accumulate_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        idx_accumulate_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
      const int64_t n = p.B * p.K > p.G * p.K ? p.B * p.K : p.G * p.K;
      idx_finish_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t group_advantages_workspace_bytes(const GroupAdvantagesArgs& args) {
  const Plan pl = make_plan(args);
  return pl.ok ? pl.bytes : 0;
}

int group_advantages_num_launches(const GroupAdvantagesArgs& args) {
  const Plan pl = make_plan(args);
  return pl.ok ? pl.launches : -1;
}

cudaError_t group_advantages(const GroupAdvantagesArgs& args, cudaStream_t stream) {
  const Plan pl = make_plan(args);
  if (!pl.ok) return cudaErrorInvalidValue;
  if (pl.path == kPathEmpty) return cudaSuccess;
  if (pl.bytes > 0 && args.workspace == nullptr) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::kFloat32: return run<float>(args, pl, stream);
    case DType::kFloat64: return run<double>(args, pl, stream);
    case DType::kFloat16: return run<__half>(args, pl, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(args, pl, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tbk
