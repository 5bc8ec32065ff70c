// Flow-matching GRPO step, CUDA kernels (contract: csrc/cpu/flow_step.cpp, ops.cpp; API:
// flow_step_kernels.h).
//
// The op is purely bandwidth-bound (a few FLOPs per element, 3-5 latent tensors streamed once),
// so every kernel is built around wide, coalesced memory traffic:
//
//   * every thread owns a fragment of VEC = 16 / sizeof(T) elements (8 for bf16/fp16, 4 for fp32,
//     2 for fp64), T the latent dtype. Where the rows allow it (pointers 16-byte aligned, row
//     length and every input's batch stride multiples of VEC) the fragment is VEC consecutive
//     elements read with one 128-bit load per tensor; otherwise ("scalar" instantiation) it is
//     VEC elements strided by the block width, read with coalesced scalar loads and masked at the
//     tail. Both cover the same index ranges, so the launch geometry (and the workspace size)
//     never depends on alignment or strides.
//   * mixed dtypes: a bf16/fp16 model_output (and ref_model_output, grad_v) beside float32
//     latents. The kernels are templated on (TV, TL) and everything but the model-typed streams
//     is that of the all-float32 run (VEC = 4, plan, summation order): the model-typed fragments
//     are 4 elements, one 64-bit word (aligned to 8 bytes, batch strides multiples of 4). Every
//     loaded value is converted to float first, so results equal those of the run on
//     model_output converted to float32 beforehand, bit for bit (grad_v rounded to TV).
//   * accumulation in float (double for fp64), per-sample sums combined deterministically: each
//     block writes its partial sum into a workspace [B, nblk] array, and a tiny finalize kernel
//     adds a sample's partials in a fixed order (in double) and applies alpha, gamma and 1/D.
//     No atomics: results are bitwise reproducible.
//
// Layout: element e < D = C*S of sample b of a latent input is at ptr + b*bstride + e, each input
// with its own batch stride (flow_step_kernels.h; trajectory slices, batch-expanded tensors);
// the outputs and the other [B, ...] arrays are contiguous, element e of sample b at b*D + e,
// but for the map losses' old_log_prob and advantage_map, whose rows are strided the same way
// (row b at ptr + b*row_stride). So a kernel derives each input's sample base from b once and
// indexes inputs by e, outputs by b*D + e.
//
// Launch structure (B samples, latent [B, C, S], D = C*S, VEC as above):
//   forward, reduction mean / none:  fwd_flat_kernel     grid B*nblk x 256 threads; block
//                                     (b, k) handles elements [k*chunk, (k+1)*chunk) of sample b
//                                  -> fwd_finalize_kernel grid B (logp for mean, ref_sq)
//   forward, reduction channel_sum:  fwd_channel_kernel  grid B*nblk, block (TX, G), TX*G = 256:
//                                     a tile of TX*VEC spatial positions, the C channels split
//                                     over the G thread rows (c = ty, ty+G, ...) and combined in
//                                     shared memory
//                                  -> fwd_finalize_kernel grid B (ref_sq)
//   backward (any reduction):        bwd_kernel          grid B*nblk x 256, like fwd_flat_kernel
//                                     (no workspace, no reduction)
//   flow_grpo_loss's surrogates:     surrogate_kernel    one warp ([B] log-probs, no map)
//                                     map_surrogate_kernel + map_finalize_kernel (ViPO map,
//                                     [B, positions]; see their section)
//   flow_grpo_elem_loss:             elem_loss_kernel    grid B*nblk x 256, like fwd_flat_kernel
//                                     (5 double partials per block)
//                                  -> elem_finalize_kernel one block (see their section)
// Sizes (plan_flat / plan_forward), step = 256*VEC:
//   flat:    chunk = min(clamp(ceil(ceil(B*D / 4096) / step), 1, 16) * step, ceil(D/step)*step),
//            nblk = ceil(D / chunk)       (bf16 [8,16,21,60,104]: chunk 4096, 4096 blocks;
//                                          B = 1: chunk 2048, 1024 blocks)
//   channel: G doubles from 1 while 2G <= C, G < 8 and B*ceil(S/VEC)*G < 262144; TX = 256/G,
//            nblk = ceil(S / (TX*VEC))
//   workspace bytes = (reduction == mean ? 2 : 1) * round_up(B*nblk*sizeof(Acc), 256), or 0 when
//            nblk == 0 (D == 0, or S == 0 for channel_sum); elem loss (flat plan):
//            5 * B*nblk * 8 (double partials)
#include "flow_step_kernels.h"

#include "../flow_grpo_surrogate.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace tbk {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // block size of the main kernels
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Flat kernels: a block's chunk is a whole number of "steps" of kThreads*VEC elements, between
// kMinSteps and kMaxSteps of them, aiming at ~kTargetBlocks blocks over the whole batch (several
// waves on 132 SMs, so the tail wave is cheap; bigger problems get longer chunks instead of more
// partials).
constexpr int64_t kTargetBlocks = 4096;
constexpr int64_t kMinSteps = 1;
constexpr int64_t kMaxSteps = 16;
// channel_sum kernel: the channel split G grows (1, 2, 4, 8, never above C) until the grid has
// at least this many threads, so a small batch still fills the GPU.
constexpr int64_t kTargetThreads = 262144;
constexpr int kMaxChannelSplit = 8;
constexpr int kFinalizeThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;
constexpr size_t kAlign = 256;

// ------------------------------------------------------------------------------------------
// Element types.

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  __device__ static __forceinline__ float to_acc(float v) { return v; }
  __device__ static __forceinline__ float from_acc(float v) { return v; }
};
template <>
struct Elem<double> {
  using Acc = double;
  __device__ static __forceinline__ double to_acc(double v) { return v; }
  __device__ static __forceinline__ double from_acc(double v) { return v; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  __device__ static __forceinline__ float to_acc(__half v) { return __half2float(v); }
  __device__ static __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  __device__ static __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
};

// Elements per 128-bit word.
template <typename T>
constexpr int kVecOf = static_cast<int>(16 / sizeof(T));

// The latent kernels stream two element types: TV (model_output, ref_model_output, grad_v) and
// TL (sample, prev_sample / noise, grad_mean, mean_out, prev_out); the pair is the same type, or
// a bfloat16 / float16 model output beside float32 latents. Every loaded value is converted to
// Acc = Elem<TL>::Acc first. A fragment is kFrag = VEC of the latent type elements (one 128-bit
// word of TL; of TV, one word too, or half of one, 8 bytes, for a 2-byte model type beside
// float32 latents): the launch plan, the fragments and every summation order are those of the
// all-TL run, so a mixed run equals, bit for bit, the run on model_output converted to TL first
// (but for grad_v, rounded to TV).
template <typename TV, typename TL>
constexpr int kFrag = kVecOf<TL>;

// Products and sums that must not be contracted into FMAs: the mean and the sampled prev are
// rounded to the latent dtype (mean_out, prev_out), and the reference / CPU kernels compute them
// as separately rounded products and sums. Everything else may use FMAs.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Sample b of a latent input with batch stride bstride; an absent input (null) stays null.
template <typename T>
__device__ __forceinline__ const T* sample_of(const T* p, int64_t b, int64_t bstride) {
  return p == nullptr ? nullptr : p + b * bstride;
}

// ------------------------------------------------------------------------------------------
// Fragment access. A fragment is N values of type T: with kVec, N consecutive elements at p
// (always fully valid) read as words of frag_word<T, N> bytes: N*sizeof(T) a multiple of 16
// (128-bit words), or 8 (one 64-bit word: a 2-byte model type beside float32 latents), p aligned
// to that word; otherwise elements p[j*stride], j < nvalid (the rest read as 0 / not written).
template <typename T, int N>
constexpr size_t frag_word = N * sizeof(T) < 16 ? N * sizeof(T) : 16;


template <bool kVec, typename T, int N>
__device__ __forceinline__ void load_frag(const T* __restrict__ p, int64_t stride, int nvalid,
                                          typename Elem<T>::Acc (&out)[N]) {
  using Acc = typename Elem<T>::Acc;
  if constexpr (kVec) {
    static_assert((N * sizeof(T)) % 16 == 0 || N * sizeof(T) == 8,
                  "vector fragment must be whole 16-byte words, or one 8-byte word");
    T raw[N];
    if constexpr (N * sizeof(T) == 8) {
      const unsigned long long u = __ldg(reinterpret_cast<const unsigned long long*>(p));
      memcpy(&raw[0], &u, 8);
    } else {
      constexpr int kPer = static_cast<int>(16 / sizeof(T));
#pragma unroll
      for (int k = 0; k < N / kPer; ++k) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + k);
        memcpy(&raw[k * kPer], &u, 16);
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = Elem<T>::to_acc(raw[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = j < nvalid ? Elem<T>::to_acc(p[j * stride]) : Acc(0);
  }
}

template <bool kVec, typename T, int N>
__device__ __forceinline__ void store_frag(T* __restrict__ p, int64_t stride, int nvalid,
                                           const T (&in)[N]) {
  if constexpr (kVec) {
    static_assert((N * sizeof(T)) % 16 == 0 || N * sizeof(T) == 8,
                  "vector fragment must be whole 16-byte words, or one 8-byte word");
    if constexpr (N * sizeof(T) == 8) {
      unsigned long long u;
      memcpy(&u, &in[0], 8);
      *reinterpret_cast<unsigned long long*>(p) = u;
    } else {
      constexpr int kPer = static_cast<int>(16 / sizeof(T));
#pragma unroll
      for (int k = 0; k < N / kPer; ++k) {
        uint4 u;
        memcpy(&u, &in[k * kPer], 16);
        reinterpret_cast<uint4*>(p)[k] = u;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < nvalid) p[j * stride] = in[j];
  }
}

// Sum of a and b over the whole block (blockDim a multiple of 32, at most 1024 threads); the
// result is valid in thread 0. A fixed shuffle tree: deterministic. One call per kernel (no
// trailing barrier).
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A sm[2 * kWarp];
  const int t = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  const int nwarps = static_cast<int>(blockDim.x * blockDim.y) / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    a += __shfl_xor_sync(kFullMask, a, off);
    b += __shfl_xor_sync(kFullMask, b, off);
  }
  const int lane = t & (kWarp - 1), warp = t / kWarp;
  if (lane == 0) {
    sm[warp] = a;
    sm[kWarp + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sm[lane] : A(0);
    b = lane < nwarps ? sm[kWarp + lane] : A(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      a += __shfl_xor_sync(kFullMask, a, off);
      b += __shfl_xor_sync(kFullMask, b, off);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Forward.

template <typename TV, typename TL>
struct FwdParams {
  using Acc = typename Elem<TL>::Acc;
  static_assert(std::is_same<Acc, typename Elem<TV>::Acc>::value, "one accumulation type");
  const TV* v;
  const TL* x;
  const TL* pn;   // prev_sample or noise, may be null
  const TV* ref;  // may be null
  const Acc* coefs;
  Acc* logp;
  Acc* ref_sq;
  TL* mean_out;  // may be null
  TL* prev_out;  // sampling only
  Acc* part_sq;   // [B, nblk], reduction mean only
  Acc* part_ref;  // [B, nblk], with a reference only
  int64_t bs_v, bs_x, bs_pn, bs_ref;  // batch strides of the inputs (elements, -1 resolved)
  int64_t B, C, S, D;
  int64_t chunk;  // flat kernel: elements per block (a multiple of kThreads*VEC)
  int64_t nblk;   // blocks per sample
};

// The per-element transition shared by both forward kernels: returns d^2 and stores the mean /
// sampled prev of element j into the fragments.
template <typename T, bool kSampling>
struct Transition {
  using Acc = typename Elem<T>::Acc;
  Acc cx, cv, sd;
  bool has_pn;
  __device__ __forceinline__ Acc d2(Acc v, Acc x, Acc pn, T& mean_t, T& prev_t) const {
    const Acc mean = add_rn(mul_rn(cx, x), mul_rn(cv, v));
    Acc prev;
    if constexpr (kSampling) {
      prev = has_pn ? add_rn(mean, mul_rn(sd, pn)) : mean;
      prev_t = Elem<T>::from_acc(prev);
      // The log-prob is of the sample actually stored: round-trip through the latent dtype.
      prev = Elem<T>::to_acc(prev_t);
    } else {
      prev = has_pn ? pn : mean;
    }
    mean_t = Elem<T>::from_acc(mean);
    const Acc d = prev - mean;
    return d * d;
  }
};

template <typename TV, typename TL, bool kVec, int kRed, bool kSampling>
__global__ void __launch_bounds__(kThreads) fwd_flat_kernel(const FwdParams<TV, TL> p) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * V;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / p.nblk, k = blk - b * p.nblk;
  const Acc* cf = p.coefs + b * 5;
  const Transition<TL, kSampling> tr{cf[0], cf[1], cf[4], p.pn != nullptr};
  const Acc alpha = cf[2], gamma = cf[3];
  const bool has_ref = p.ref != nullptr, has_mean = p.mean_out != nullptr;
  const int64_t e1 = (k + 1) * p.chunk < p.D ? (k + 1) * p.chunk : p.D;
  const TV* v = p.v + b * p.bs_v;
  const TL* x = p.x + b * p.bs_x;
  const TL* pn = sample_of(p.pn, b, p.bs_pn);
  const TV* ref = sample_of(p.ref, b, p.bs_ref);
  const int64_t base = b * p.D;  // of the outputs
  const int64_t stride = kVec ? 1 : kThreads;  // between the elements of one fragment
  const int tx = static_cast<int>(threadIdx.x);

  Acc sq = 0, rs = 0;
  for (int64_t e = k * p.chunk + (kVec ? tx * V : tx); e < e1; e += kStep) {
    const int nvalid =
        kVec ? V : static_cast<int>((e1 - e + kThreads - 1) / kThreads < V
                                        ? (e1 - e + kThreads - 1) / kThreads
                                        : V);
    const int64_t i = base + e;
    Acc vv[V], xx[V], nn[V], rr[V];
    load_frag<kVec>(v + e, stride, nvalid, vv);
    load_frag<kVec>(x + e, stride, nvalid, xx);
    if (tr.has_pn) load_frag<kVec>(pn + e, stride, nvalid, nn);
    if (has_ref) load_frag<kVec>(ref + e, stride, nvalid, rr);
    TL mean_t[V], prev_t[V];
    [[maybe_unused]] Acc lp[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Acc d2 = tr.d2(vv[j], xx[j], tr.has_pn ? nn[j] : Acc(0), mean_t[j], prev_t[j]);
      if constexpr (kRed == kFlowReduceMean) {
        if (j < nvalid) sq += d2;
      } else {
        lp[j] = alpha * d2 + gamma;
      }
      if (has_ref && j < nvalid) {
        const Acc dr = vv[j] - rr[j];
        rs += dr * dr;
      }
    }
    if constexpr (kRed == kFlowReduceNone) store_frag<kVec>(p.logp + i, stride, nvalid, lp);
    if constexpr (kSampling) store_frag<kVec>(p.prev_out + i, stride, nvalid, prev_t);
    if (has_mean) store_frag<kVec>(p.mean_out + i, stride, nvalid, mean_t);
  }
  if (kRed == kFlowReduceMean || has_ref) {  // uniform over the block
    block_sum2(sq, rs);
    if (tx == 0) {
      if (kRed == kFlowReduceMean) p.part_sq[blk] = sq;
      if (has_ref) p.part_ref[blk] = rs;
    }
  }
}

// Block (TX, G): thread (tx, ty) owns VEC spatial positions of tile k of sample b and channels
// ty, ty+G, ...; the G per-position partial sums are combined in shared memory by row ty = 0.
template <typename TV, typename TL, bool kVec, bool kSampling>
__global__ void __launch_bounds__(kThreads) fwd_channel_kernel(const FwdParams<TV, TL> p) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  __shared__ Acc red[kThreads * V];
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / p.nblk, k = blk - b * p.nblk;
  const int TX = static_cast<int>(blockDim.x), G = static_cast<int>(blockDim.y);
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const Acc* cf = p.coefs + b * 5;
  const Transition<TL, kSampling> tr{cf[0], cf[1], cf[4], p.pn != nullptr};
  const Acc alpha = cf[2], gamma = cf[3];
  const bool has_ref = p.ref != nullptr, has_mean = p.mean_out != nullptr;
  const TV* v = p.v + b * p.bs_v;
  const TL* x = p.x + b * p.bs_x;
  const TL* pn = sample_of(p.pn, b, p.bs_pn);
  const TV* ref = sample_of(p.ref, b, p.bs_ref);
  const int64_t stride = kVec ? 1 : TX;
  const int64_t s0 = k * TX * V + (kVec ? tx * V : tx);  // first position of the fragment
  int nvalid;
  if (kVec) {
    nvalid = s0 < p.S ? V : 0;
  } else {
    const int64_t n = s0 < p.S ? (p.S - s0 + TX - 1) / TX : 0;
    nvalid = static_cast<int>(n < V ? n : V);
  }

  Acc acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0;
  Acc rs = 0, dummy = 0;
  if (nvalid > 0) {
    for (int64_t c = ty; c < p.C; c += G) {
      const int64_t e = c * p.S + s0;  // within the sample
      const int64_t i = b * p.D + e;   // of the outputs
      Acc vv[V], xx[V], nn[V], rr[V];
      load_frag<kVec>(v + e, stride, nvalid, vv);
      load_frag<kVec>(x + e, stride, nvalid, xx);
      if (tr.has_pn) load_frag<kVec>(pn + e, stride, nvalid, nn);
      if (has_ref) load_frag<kVec>(ref + e, stride, nvalid, rr);
      TL mean_t[V], prev_t[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc[j] += tr.d2(vv[j], xx[j], tr.has_pn ? nn[j] : Acc(0), mean_t[j], prev_t[j]);
        if (has_ref && j < nvalid) {
          const Acc dr = vv[j] - rr[j];
          rs += dr * dr;
        }
      }
      if constexpr (kSampling) store_frag<kVec>(p.prev_out + i, stride, nvalid, prev_t);
      if (has_mean) store_frag<kVec>(p.mean_out + i, stride, nvalid, mean_t);
    }
  }
  if (G > 1) {  // uniform over the block
    if (ty > 0) {
#pragma unroll
      for (int j = 0; j < V; ++j) red[((ty - 1) * V + j) * TX + tx] = acc[j];
    }
    __syncthreads();
    if (ty == 0) {
      for (int g = 1; g < G; ++g) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += red[((g - 1) * V + j) * TX + tx];
      }
    }
  }
  if (ty == 0 && nvalid > 0) {
    const Acc gc = gamma * static_cast<Acc>(p.C);
    Acc lp[V];
#pragma unroll
    for (int j = 0; j < V; ++j) lp[j] = alpha * acc[j] + gc;
    store_frag<kVec>(p.logp + b * p.S + s0, stride, nvalid, lp);
  }
  if (has_ref) {  // uniform over the block
    block_sum2(rs, dummy);
    if (tx == 0 && ty == 0) p.part_ref[blk] = rs;
  }
}

// One block per sample: adds the sample's partials in a fixed order (in double).
template <typename Acc>
__global__ void __launch_bounds__(kFinalizeThreads)
    fwd_finalize_kernel(const Acc* __restrict__ part_sq, const Acc* __restrict__ part_ref,
                        const Acc* __restrict__ coefs, Acc* __restrict__ logp,
                        Acc* __restrict__ ref_sq, int64_t nblk, double D, int do_mean,
                        int has_ref) {
  const int64_t b = blockIdx.x;
  double s = 0.0, r = 0.0;
  for (int64_t k = threadIdx.x; k < nblk; k += blockDim.x) {
    if (do_mean) s += static_cast<double>(part_sq[b * nblk + k]);
    if (has_ref) r += static_cast<double>(part_ref[b * nblk + k]);
  }
  block_sum2(s, r);
  if (threadIdx.x == 0) {
    if (do_mean) {
      logp[b] = static_cast<Acc>(static_cast<double>(coefs[b * 5 + 2]) * s / D +
                                 static_cast<double>(coefs[b * 5 + 3]));
    }
    ref_sq[b] = has_ref ? static_cast<Acc>(r) : Acc(0);
  }
}

// ------------------------------------------------------------------------------------------
// Backward: grad_v = cv gm - 2 alpha cv gl d + 2 gq (v - vref), one elementwise pass.

template <typename TV, typename TL>
struct BwdParams {
  using Acc = typename Elem<TL>::Acc;
  static_assert(std::is_same<Acc, typename Elem<TV>::Acc>::value, "one accumulation type");
  const TV* v;
  const TL* x;
  const TL* prev;  // may be null (prev = mean)
  const TV* ref;
  const Acc* coefs;
  const Acc* grad_logp;  // may be null
  const TL* grad_mean;   // may be null
  const Acc* grad_ref_sq;  // null unless a reference is given too
  TV* grad_v;
  int64_t bs_v, bs_x, bs_prev, bs_ref, bs_gm;  // batch strides of the inputs (-1 resolved)
  int64_t B, C, S, D;
  int64_t chunk, nblk;
};

template <typename TV, typename TL, bool kVec, int kRed>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams<TV, TL> p) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * V;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / p.nblk, k = blk - b * p.nblk;
  const Acc* cf = p.coefs + b * 5;
  const Acc cx = cf[0], cv = cf[1], alpha = cf[2];
  const bool has_gl = p.grad_logp != nullptr, has_gm = p.grad_mean != nullptr;
  const bool has_gq = p.grad_ref_sq != nullptr;
  const bool has_prev = p.prev != nullptr;
  // d logp_e / d v_e = -2 alpha cv d_e; the per-sample factors folded once (as the CPU kernel).
  const Acc lp_scale = Acc(-2) * alpha * cv;
  const Acc inv_d = Acc(1) / static_cast<Acc>(p.C * p.S);
  const Acc gl_sample = (has_gl && kRed == kFlowReduceMean) ? p.grad_logp[b] * inv_d : Acc(0);
  const Acc gq2 = has_gq ? Acc(2) * p.grad_ref_sq[b] : Acc(0);
  const int64_t e1 = (k + 1) * p.chunk < p.D ? (k + 1) * p.chunk : p.D;
  const TV* v = p.v + b * p.bs_v;
  const TL* x = p.x + b * p.bs_x;
  const TL* prev = sample_of(p.prev, b, p.bs_prev);
  const TV* ref = sample_of(p.ref, b, p.bs_ref);
  const TL* grad_mean = sample_of(p.grad_mean, b, p.bs_gm);
  const int64_t base = b * p.D;  // of grad_v and a reduction-none grad_logp
  const int64_t stride = kVec ? 1 : kThreads;
  const int tx = static_cast<int>(threadIdx.x);

  for (int64_t e = k * p.chunk + (kVec ? tx * V : tx); e < e1; e += kStep) {
    const int nvalid =
        kVec ? V : static_cast<int>((e1 - e + kThreads - 1) / kThreads < V
                                        ? (e1 - e + kThreads - 1) / kThreads
                                        : V);
    const int64_t i = base + e;
    // Every load of the step is issued before any arithmetic, so one thread keeps all its
    // streams in flight at once.
    Acc vv[V], xx[V], pp[V], gl[V], gm[V], rr[V];
    load_frag<kVec>(v + e, stride, nvalid, vv);
    if (has_gl) {
      load_frag<kVec>(x + e, stride, nvalid, xx);
      if (has_prev) load_frag<kVec>(prev + e, stride, nvalid, pp);
      if constexpr (kRed == kFlowReduceChannelSum) {
        // With kVec, S % VEC == 0, so the fragment lies in one channel row. Otherwise each
        // element finds its own spatial position.
        if constexpr (kVec) {
          load_frag<true>(p.grad_logp + b * p.S + e % p.S, 1, V, gl);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j)
            gl[j] = j < nvalid ? p.grad_logp[b * p.S + (e + j * stride) % p.S] : Acc(0);
        }
      } else if constexpr (kRed == kFlowReduceNone) {
        load_frag<kVec>(p.grad_logp + i, stride, nvalid, gl);
      }
    }
    if (has_gm) load_frag<kVec>(grad_mean + e, stride, nvalid, gm);
    if (has_gq) load_frag<kVec>(ref + e, stride, nvalid, rr);

    Acc g[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      g[j] = 0;  // same order of terms as the CPU kernel
      if (has_gl) {
        const Acc mean = add_rn(mul_rn(cx, xx[j]), mul_rn(cv, vv[j]));
        const Acc d = (has_prev ? pp[j] : mean) - mean;
        g[j] += lp_scale * (kRed == kFlowReduceMean ? gl_sample : gl[j]) * d;
      }
      if (has_gm) g[j] += cv * gm[j];
      if (has_gq) g[j] += gq2 * (vv[j] - rr[j]);
    }
    TV out[V];
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = Elem<TV>::from_acc(g[j]);
    store_frag<kVec>(p.grad_v + i, stride, nvalid, out);
  }
}

// ------------------------------------------------------------------------------------------
// Host side: plans and launchers.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

int elem_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  return 0;
}

// A latent input's batch stride (or the row stride of old_log_prob / an advantage map) is -1
// (contiguous) or >= 0, and small enough that the last sample's elements lie at int64 offsets
// (B samples, or rows, of D elements).
bool valid_bstride(int64_t bstride, int64_t B, int64_t D) {
  return bstride >= -1 && (B <= 1 || bstride <= (INT64_MAX - D) / (B - 1));
}

int64_t resolve_bstride(int64_t bstride, int64_t D) { return bstride == -1 ? D : bstride; }

// A latent input (or a row-strided [B, N] Acc input) read in fragments of N elements, words of
// W = frag_word<T, N> bytes (16; 8 for a 2-byte model type beside float32 latents): its first
// sample (row) W-byte aligned, and (stride a multiple of W / sizeof(T) elements) so is every
// other. An absent input (null) is not read. For an output (contiguous): stride 0.
template <int N, typename T>
bool vec_input(const T* p, int64_t bstride) {
  constexpr size_t kWord = frag_word<T, N>;
  return (reinterpret_cast<uintptr_t>(p) & (kWord - 1)) == 0 &&
         (p == nullptr || bstride % static_cast<int64_t>(kWord / sizeof(T)) == 0);
}

// The element types of the latent ops: `latent` (dtype) and model_output's, kSameDType meaning
// `latent`. Allowed: one type, or a bfloat16 / float16 model output beside float32 latents.
DType resolve_model_dtype(DType latent, DType model) {
  return model == kSameDType ? latent : model;
}

bool valid_dtypes(DType latent, DType model) {
  if (elem_size(latent) == 0) return false;
  const DType m = resolve_model_dtype(latent, model);
  return m == latent ||
         (latent == DType::kFloat32 && (m == DType::kBFloat16 || m == DType::kFloat16));
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<TV>{}, Tag<TL>{}) for the allowed pairs (valid_dtypes), cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t dispatch_dtypes(DType latent, DType model, F&& f) {
  const DType m = resolve_model_dtype(latent, model);
  if (m == latent) {
    switch (latent) {
      case DType::kFloat32: return f(Tag<float>{}, Tag<float>{});
      case DType::kFloat64: return f(Tag<double>{}, Tag<double>{});
      case DType::kFloat16: return f(Tag<__half>{}, Tag<__half>{});
      case DType::kBFloat16: return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
    }
  } else if (latent == DType::kFloat32) {
    if (m == DType::kBFloat16) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
    if (m == DType::kFloat16) return f(Tag<__half>{}, Tag<float>{});
  }
  return cudaErrorInvalidValue;
}

// Blocks per sample and chunk (elements) of the flat kernels; depends on sizes only.
struct FlatPlan {
  int64_t chunk = 0, nblk = 0;
};

FlatPlan plan_flat(int64_t B, int64_t D, int esize) {
  FlatPlan f;
  if (B <= 0 || D <= 0) return f;
  const int64_t step = static_cast<int64_t>(kThreads) * (16 / esize);
  const int64_t steps = clamp64(ceil_div(ceil_div(B * D, kTargetBlocks), step), kMinSteps,
                                kMaxSteps);
  f.chunk = steps * step;
  if (f.chunk > ceil_div(D, step) * step) f.chunk = ceil_div(D, step) * step;
  f.nblk = ceil_div(D, f.chunk);
  return f;
}

struct FwdPlan {
  bool ok = false;
  bool channel = false;
  int64_t chunk = 0, nblk = 0;  // nblk: main-kernel blocks per sample (0: no main launch)
  int G = 1, TX = kThreads;     // channel kernel block shape
  size_t off_sq = 0, off_ref = 0, bytes = 0;
  int launches = 0;
};

FwdPlan plan_forward(const FlowStepForwardArgs& a) {
  FwdPlan pl;
  const int es = elem_size(a.dtype);  // of the latents: the plan of the all-latent-type run
  if (!valid_dtypes(a.dtype, a.model_dtype) || a.batch < 0 || a.channels < 0 || a.spatial < 0)
    return pl;
  if (a.reduction < kFlowReduceMean || a.reduction > kFlowReduceNone) return pl;
  const int64_t B = a.batch, C = a.channels, S = a.spatial;
  if (C > 0 && S > INT64_MAX / C) return pl;
  const int64_t D = C * S;
  if (B > 0 && D > INT64_MAX / B) return pl;
  if (!valid_bstride(a.model_output_bstride, B, D) || !valid_bstride(a.sample_bstride, B, D) ||
      !valid_bstride(a.prev_bstride, B, D) || !valid_bstride(a.ref_bstride, B, D))
    return pl;
  pl.ok = true;
  if (B == 0) return pl;
  const int vec = 16 / es;
  if (a.reduction == kFlowReduceChannelSum) {
    pl.channel = true;
    int G = 1;
    const int64_t frag_threads = B * ceil_div(S, vec);
    while (G < kMaxChannelSplit && 2 * G <= C && frag_threads * G < kTargetThreads) G *= 2;
    pl.G = G;
    pl.TX = kThreads / G;
    pl.nblk = S > 0 ? ceil_div(S, static_cast<int64_t>(pl.TX) * vec) : 0;
  } else {
    const FlatPlan f = plan_flat(B, D, es);
    pl.chunk = f.chunk;
    pl.nblk = f.nblk;
  }
  if (B * pl.nblk > kMaxGrid || B > kMaxGrid) {
    pl.ok = false;
    return pl;
  }
  const size_t acc = a.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  const size_t part = round_up(static_cast<size_t>(B * pl.nblk) * acc, kAlign);
  size_t cur = 0;
  if (a.reduction == kFlowReduceMean) {
    pl.off_sq = cur;
    cur += part;
  }
  pl.off_ref = cur;
  cur += part;
  pl.bytes = pl.nblk > 0 ? cur : 0;
  pl.launches = (pl.nblk > 0 ? 1 : 0) + 1;
  return pl;
}

template <typename TV, typename TL>
cudaError_t run_forward(const FlowStepForwardArgs& a, const FwdPlan& pl, cudaStream_t stream) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  FwdParams<TV, TL> p{};
  p.v = static_cast<const TV*>(a.model_output);
  p.x = static_cast<const TL*>(a.sample);
  p.pn = static_cast<const TL*>(a.prev_or_noise);
  p.ref = static_cast<const TV*>(a.ref_model_output);
  p.coefs = static_cast<const Acc*>(a.coefs);
  p.logp = static_cast<Acc*>(a.logp);
  p.ref_sq = static_cast<Acc*>(a.ref_sq);
  p.mean_out = static_cast<TL*>(a.mean_out);
  p.prev_out = a.sampling ? static_cast<TL*>(a.prev_out) : nullptr;
  char* ws = static_cast<char*>(a.workspace);
  p.part_sq = pl.bytes > 0 && a.reduction == kFlowReduceMean
                  ? reinterpret_cast<Acc*>(ws + pl.off_sq)
                  : nullptr;
  p.part_ref = pl.bytes > 0 ? reinterpret_cast<Acc*>(ws + pl.off_ref) : nullptr;
  p.B = a.batch;
  p.C = a.channels;
  p.S = a.spatial;
  p.D = a.channels * a.spatial;
  p.bs_v = resolve_bstride(a.model_output_bstride, p.D);
  p.bs_x = resolve_bstride(a.sample_bstride, p.D);
  p.bs_pn = resolve_bstride(a.prev_bstride, p.D);
  p.bs_ref = resolve_bstride(a.ref_bstride, p.D);
  p.chunk = pl.chunk;
  p.nblk = pl.nblk;

  if (pl.nblk > 0) {
    // 128-bit fragments need every streamed pointer aligned to its words (each sample's too:
    // vec_input) and whole vectors per row.
    const int64_t row = pl.channel ? p.S : p.D;
    bool vec = row % V == 0 && vec_input<V>(p.v, p.bs_v) && vec_input<V>(p.x, p.bs_x) &&
               vec_input<V>(p.pn, p.bs_pn) && vec_input<V>(p.ref, p.bs_ref) &&
               vec_input<V>(p.mean_out, 0) && vec_input<V>(p.prev_out, 0);
    if (a.reduction != kFlowReduceMean) vec = vec && vec_input<V>(p.logp, 0);
    const dim3 grid(static_cast<unsigned>(p.B * pl.nblk));
    const int red = a.reduction;
    const bool smp = a.sampling;
#define TBK_FWD_FLAT(VEC, RED, SMP) \
  fwd_flat_kernel<TV, TL, VEC, RED, SMP><<<grid, kThreads, 0, stream>>>(p)
#define TBK_FWD_FLAT_R(VEC, SMP)                                 \
  do {                                                           \
    if (red == kFlowReduceMean) TBK_FWD_FLAT(VEC, kFlowReduceMean, SMP); \
    else TBK_FWD_FLAT(VEC, kFlowReduceNone, SMP);                \
  } while (0)
    if (pl.channel) {
      const dim3 block(static_cast<unsigned>(pl.TX), static_cast<unsigned>(pl.G));
      if (vec) {
        if (smp) fwd_channel_kernel<TV, TL, true, true><<<grid, block, 0, stream>>>(p);
        else fwd_channel_kernel<TV, TL, true, false><<<grid, block, 0, stream>>>(p);
      } else {
        if (smp) fwd_channel_kernel<TV, TL, false, true><<<grid, block, 0, stream>>>(p);
        else fwd_channel_kernel<TV, TL, false, false><<<grid, block, 0, stream>>>(p);
      }
    } else if (vec) {
      if (smp) TBK_FWD_FLAT_R(true, true);
      else TBK_FWD_FLAT_R(true, false);
    } else {
      if (smp) TBK_FWD_FLAT_R(false, true);
      else TBK_FWD_FLAT_R(false, false);
    }
#undef TBK_FWD_FLAT_R
#undef TBK_FWD_FLAT
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Finalize: per-sample mean log-prob and ref_sq (zeros without a reference). With nblk == 0
  // (D == 0) the sums are empty: ref_sq = 0 and the mean is 0/0 = NaN, as on the CPU.
  const int64_t need = pl.nblk < kFinalizeThreads ? pl.nblk : kFinalizeThreads;
  const unsigned fin_threads =
      static_cast<unsigned>(clamp64(ceil_div(need, kWarp) * kWarp, kWarp, kFinalizeThreads));
  fwd_finalize_kernel<Acc><<<static_cast<unsigned>(p.B), fin_threads, 0, stream>>>(
      p.part_sq, p.part_ref, p.coefs, p.logp, p.ref_sq, pl.nblk, static_cast<double>(p.D),
      a.reduction == kFlowReduceMean ? 1 : 0, (p.ref != nullptr && pl.nblk > 0) ? 1 : 0);
  return cudaGetLastError();
}

template <typename TV, typename TL>
cudaError_t run_backward(const FlowStepBackwardArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  BwdParams<TV, TL> p{};
  p.v = static_cast<const TV*>(a.model_output);
  p.x = static_cast<const TL*>(a.sample);
  p.prev = static_cast<const TL*>(a.prev_sample);
  p.ref = static_cast<const TV*>(a.ref_model_output);
  p.coefs = static_cast<const Acc*>(a.coefs);
  p.grad_logp = static_cast<const Acc*>(a.grad_logp);
  p.grad_mean = static_cast<const TL*>(a.grad_mean);
  p.grad_ref_sq = a.ref_model_output != nullptr ? static_cast<const Acc*>(a.grad_ref_sq) : nullptr;
  p.grad_v = static_cast<TV*>(a.grad_v);
  p.B = a.batch;
  p.C = a.channels;
  p.S = a.spatial;
  p.D = a.channels * a.spatial;
  p.bs_v = resolve_bstride(a.model_output_bstride, p.D);
  p.bs_x = resolve_bstride(a.sample_bstride, p.D);
  p.bs_prev = resolve_bstride(a.prev_bstride, p.D);
  p.bs_ref = resolve_bstride(a.ref_bstride, p.D);
  p.bs_gm = resolve_bstride(a.grad_mean_bstride, p.D);
  const FlatPlan f = plan_flat(p.B, p.D, static_cast<int>(sizeof(TL)));
  if (f.nblk == 0) return cudaSuccess;
  if (p.B * f.nblk > kMaxGrid) return cudaErrorInvalidValue;
  p.chunk = f.chunk;
  p.nblk = f.nblk;
  const int red = a.reduction;
  const int64_t row = red == kFlowReduceChannelSum ? p.S : p.D;
  bool vec = row % V == 0 && vec_input<V>(p.v, p.bs_v) && vec_input<V>(p.x, p.bs_x) &&
             vec_input<V>(p.prev, p.bs_prev) && vec_input<V>(p.ref, p.bs_ref) &&
             vec_input<V>(p.grad_mean, p.bs_gm) && vec_input<V>(p.grad_v, 0);
  if (red != kFlowReduceMean) vec = vec && vec_input<V>(p.grad_logp, 0);
  const dim3 grid(static_cast<unsigned>(p.B * f.nblk));
#define TBK_BWD(VEC)                                                                \
  do {                                                                              \
    if (red == kFlowReduceMean)                                                     \
      bwd_kernel<TV, TL, VEC, kFlowReduceMean><<<grid, kThreads, 0, stream>>>(p);    \
    else if (red == kFlowReduceChannelSum)                                          \
      bwd_kernel<TV, TL, VEC, kFlowReduceChannelSum><<<grid, kThreads, 0, stream>>>(p); \
    else                                                                            \
      bwd_kernel<TV, TL, VEC, kFlowReduceNone><<<grid, kThreads, 0, stream>>>(p);    \
  } while (0)
  if (vec) TBK_BWD(true);
  else TBK_BWD(false);
#undef TBK_BWD
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// flow_grpo_loss's per-sample surrogate: one warp strides over the B samples, each lane adds its
// samples' terms in double, and a fixed shuffle tree combines the lanes (deterministic). A warp
// is enough: B is a batch of samples (at most a few thousand), and one launch, not parallelism,
// is what this kernel is for.

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename Acc>
__global__ void __launch_bounds__(kWarp)
    surrogate_kernel(const surrogate::Constants<Acc> k, int64_t B, const Acc* __restrict__ logp,
                     const Acc* __restrict__ ref_sq, const Acc* __restrict__ kl_weight,
                     const Acc* __restrict__ old, const Acc* __restrict__ adv,
                     Acc* __restrict__ loss, Acc* __restrict__ metrics, Acc* __restrict__ factors) {
  surrogate::Sums s;
  for (int64_t b = threadIdx.x; b < B; b += kWarp) {
    surrogate::sample_term(k, logp[b], old[b], adv[b], k.has_ref ? ref_sq[b] : Acc(0),
                           k.has_ref ? kl_weight[b] : Acc(0), s, factors + b, factors + B + b);
  }
  s.policy = warp_sum(s.policy);
  s.kl = warp_sum(s.kl);
  s.delta_sq = warp_sum(s.delta_sq);
  s.clipped = warp_sum(s.clipped);
  s.ratio = warp_sum(s.ratio);
  if (threadIdx.x == 0) surrogate::finish(k, s, B, B, loss, metrics);
}

template <typename Acc>
cudaError_t run_surrogate(const FlowGrpoSurrogateArgs& a, cudaStream_t stream) {
  const auto k = surrogate::make_constants<Acc>(a.clip_range, a.adv_clip_max, a.beta, a.simple,
                                                a.ref_sq != nullptr, a.batch, a.batch);
  surrogate_kernel<Acc><<<1, kWarp, 0, stream>>>(
      k, a.batch, static_cast<const Acc*>(a.logp), static_cast<const Acc*>(a.ref_sq),
      static_cast<const Acc*>(a.kl_weight), static_cast<const Acc*>(a.old_log_prob),
      static_cast<const Acc*>(a.advantages), static_cast<Acc*>(a.loss),
      static_cast<Acc*>(a.metrics), static_cast<Acc*>(a.factors));
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// flow_grpo_loss's surrogate with a ViPO map: one policy term per position of [B, P] float32
// (float64) rows. map_surrogate_kernel, grid B*nblk x 256 (plan_flat over P with 4-byte
// elements: chunks of 1024..16384 positions): each thread strides over its block's chunk with
// scalar loads (no 128-bit path, so no alignment condition on the rows), writes d loss / d logp
// over logp (contiguous), reads old_log_prob and the map from their rows (row b at
// b * row stride: trajectory slices, a shared or expanded map at stride 0), and the block's four
// sums (policy, delta^2, clipped, ratio) go to partials [4, B*nblk] in double.
// map_finalize_kernel, one block: the partials in a fixed order, the KL over the batch, loss,
// metrics and d loss / d ref_sq. The inputs are read once and logp written once: 16 bytes per
// position (12 with a map shared by the batch, which stays in L2).

// Sum of the five fields of s over the block (as block_sum2; valid in thread 0, one call per
// kernel).
__device__ __forceinline__ void block_sum_sums(surrogate::Sums& s) {
  __shared__ double sm[5 * kWarp];
  double f[5] = {s.policy, s.kl, s.delta_sq, s.clipped, s.ratio};  // unrolled: registers
  const int t = static_cast<int>(threadIdx.x);
  const int nwarps = static_cast<int>(blockDim.x) / kWarp;
  const int lane = t & (kWarp - 1), warp = t / kWarp;
#pragma unroll
  for (int j = 0; j < 5; ++j) {
    f[j] = warp_sum(f[j]);
    if (lane == 0) sm[j * kWarp + warp] = f[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < 5; ++j) f[j] = warp_sum(lane < nwarps ? sm[j * kWarp + lane] : 0.0);
  }
  s.policy = f[0];
  s.kl = f[1];
  s.delta_sq = f[2];
  s.clipped = f[3];
  s.ratio = f[4];
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    map_surrogate_kernel(const surrogate::Constants<Acc> k, int64_t P, int64_t chunk,
                         int64_t nblk, Acc* __restrict__ logp, const Acc* __restrict__ old,
                         int64_t old_stride, const Acc* __restrict__ adv,
                         const Acc* __restrict__ amap, int64_t map_stride,
                         double* __restrict__ part, int64_t nprog) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / nblk, p0 = (blk - b * nblk) * chunk;
  const int64_t p1 = p0 + chunk < P ? p0 + chunk : P;
  const Acc a_b = surrogate::clamp_adv(k, adv[b]);
  Acc* row = logp + b * P;
  const Acc* old_row = old + b * old_stride;
  const Acc* map_row = amap + b * map_stride;
  surrogate::Sums s;
  for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads)
    row[p] = surrogate::policy_term(k, row[p], old_row[p], a_b * map_row[p], s) * k.inv_n;
  block_sum_sums(s);
  if (threadIdx.x == 0) {
    part[blk] = s.policy;
    part[nprog + blk] = s.delta_sq;
    part[2 * nprog + blk] = s.clipped;
    part[3 * nprog + blk] = s.ratio;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kFinalizeThreads)
    map_finalize_kernel(const surrogate::Constants<Acc> k, const double* __restrict__ part,
                        int64_t nprog, int64_t B, int64_t terms, const Acc* __restrict__ ref_sq,
                        const Acc* __restrict__ kl_weight, Acc* __restrict__ loss,
                        Acc* __restrict__ metrics, Acc* __restrict__ grad_ref_sq) {
  surrogate::Sums s;
  for (int64_t i = threadIdx.x; i < nprog; i += blockDim.x) {
    s.policy += part[i];
    s.delta_sq += part[nprog + i];
    s.clipped += part[2 * nprog + i];
    s.ratio += part[3 * nprog + i];
  }
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    grad_ref_sq[b] = surrogate::kl_term(k, k.has_ref ? ref_sq[b] : Acc(0),
                                        k.has_ref ? kl_weight[b] : Acc(0), s);
  }
  block_sum_sums(s);
  if (threadIdx.x == 0) surrogate::finish(k, s, terms, B, loss, metrics);
}

struct MapPlan {
  bool ok = false;              // consistent sizes and row strides
  int64_t chunk = 0, nblk = 0;  // per sample; nblk == 0: no main launch
  size_t bytes = 0;             // workspace: the partials [4, B*nblk] double
};

MapPlan plan_map(const FlowGrpoMapSurrogateArgs& a) {
  MapPlan m;
  if (a.batch < 0 || a.positions < 0) return m;
  if (!valid_bstride(a.old_bstride, a.batch, a.positions) ||
      (!a.map_shared && !valid_bstride(a.map_bstride, a.batch, a.positions)))
    return m;
  m.ok = true;
  const FlatPlan f = plan_flat(a.batch, a.positions, 4);
  m.chunk = f.chunk;
  m.nblk = f.nblk;
  m.bytes = static_cast<size_t>(4 * a.batch * f.nblk) * sizeof(double);
  return m;
}

template <typename Acc>
cudaError_t run_map_surrogate(const FlowGrpoMapSurrogateArgs& a, const MapPlan& pl,
                              cudaStream_t stream) {
  const auto k = surrogate::make_constants<Acc>(a.clip_range, a.adv_clip_max, a.beta, a.simple,
                                                a.ref_sq != nullptr, a.batch,
                                                a.batch * a.positions);
  const int64_t nprog = a.batch * pl.nblk;
  double* part = static_cast<double*>(a.workspace);
  if (nprog > 0) {
    map_surrogate_kernel<Acc><<<static_cast<unsigned>(nprog), kThreads, 0, stream>>>(
        k, a.positions, pl.chunk, pl.nblk, static_cast<Acc*>(a.logp),
        static_cast<const Acc*>(a.old_log_prob), resolve_bstride(a.old_bstride, a.positions),
        static_cast<const Acc*>(a.advantages), static_cast<const Acc*>(a.advantage_map),
        a.map_shared ? 0 : resolve_bstride(a.map_bstride, a.positions), part, nprog);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  map_finalize_kernel<Acc><<<1, kFinalizeThreads, 0, stream>>>(
      k, part, nprog, a.batch, a.batch * a.positions, static_cast<const Acc*>(a.ref_sq),
      static_cast<const Acc*>(a.kl_weight), static_cast<Acc*>(a.loss),
      static_cast<Acc*>(a.metrics), static_cast<Acc*>(a.grad_ref_sq));
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// flow_grpo_loss with a per-element ViPO map, the step and the surrogate fused: per element the
// log-prob, its policy term, and (write_grad) d loss / d v, which is elementwise once the
// per-sample constants are known. elem_loss_kernel, grid B*nblk x 256 (plan_flat over the N =
// C*S elements of a sample, as the backward): each thread walks its fragments of the block's
// chunk (VEC latents, and VEC old_log_prob / map values read as 128-bit words too when aligned,
// 64-bit ones for bf16 / fp16 rows beside float32 latents; old_log_prob and the map read from
// their rows, row b at b * row stride, grad_v contiguous),
// and the block's five sums (policy, delta^2, clipped, ratio, and sum (v - v_ref)^2) go to
// partials [5, B*nblk] in double. elem_finalize_kernel, one block: the policy partials in a fixed
// order, each sample's ref_sq from its own blocks in block order, the KL, loss and metrics. Per
// element the inputs are read once and grad_v written once; no log-prob buffer exists.
//
// old_log_prob and the map may each be bfloat16 / float16 beside float accumulation. Their
// types are runtime tags, tested per fragment (uniform over the grid, so the branches never
// diverge and cost next to nothing in a bandwidth-bound loop): templating on them instead would
// make each of the 10 float-accumulation instantiations 9, for compile time and binary size.

// Row input `off` elements into p, of type t (bfloat16 / float16, or Acc).
template <typename Acc>
__device__ __forceinline__ const void* row_at(const void* p, DType t, int64_t off) {
  const bool two_byte = std::is_same<Acc, float>::value &&
                        (t == DType::kBFloat16 || t == DType::kFloat16);
  return static_cast<const char*>(p) + off * static_cast<int64_t>(two_byte ? 2 : sizeof(Acc));
}

// load_frag of row values of type t at row + e, widened to Acc (exactly).
template <bool kVec, typename Acc, int V>
__device__ __forceinline__ void load_row_frag(const void* row, DType t, int64_t e,
                                              int64_t stride, int nvalid, Acc (&out)[V]) {
  if constexpr (std::is_same<Acc, float>::value) {
    if (t == DType::kBFloat16)
      return load_frag<kVec>(static_cast<const __nv_bfloat16*>(row) + e, stride, nvalid, out);
    if (t == DType::kFloat16)
      return load_frag<kVec>(static_cast<const __half*>(row) + e, stride, nvalid, out);
  }
  load_frag<kVec>(static_cast<const Acc*>(row) + e, stride, nvalid, out);
}

template <typename TV, typename TL>
struct ElemParams {
  using Acc = typename Elem<TL>::Acc;
  static_assert(std::is_same<Acc, typename Elem<TV>::Acc>::value, "one accumulation type");
  const TV* v;
  const TL* x;
  const TL* prev;
  const TV* ref;  // may be null (no reference)
  const Acc* coefs;
  const Acc* kl_weight;  // with ref
  const void* old;       // of old_t
  const Acc* adv;
  const void* amap;      // of map_t
  DType old_t, map_t;    // Acc's, or (float Acc) kBFloat16 / kFloat16
  TV* grad_v;    // may be null (no gradient)
  double* part;  // [5, nprog]
  int64_t bs_v, bs_x, bs_prev, bs_ref;  // batch strides of the latent inputs (-1 resolved)
  int64_t N;
  int64_t old_stride, map_stride;  // row strides (-1 resolved); map_stride 0 for a shared map
  int64_t chunk, nblk, nprog;
  bool kl_on;  // the gradient's KL term: a reference and beta != 0
};

template <typename TV, typename TL, bool kVec>
__global__ void __launch_bounds__(kThreads)
    elem_loss_kernel(const surrogate::Constants<typename Elem<TL>::Acc> k,
                     const ElemParams<TV, TL> p) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * V;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / p.nblk, kb = blk - b * p.nblk;
  const Acc* cf = p.coefs + b * 5;
  const Acc cx = cf[0], cv = cf[1], alpha = cf[2], gamma = cf[3];
  const Acc a_b = surrogate::clamp_adv(k, p.adv[b]);
  const bool has_ref = p.ref != nullptr, grad = p.grad_v != nullptr;
  const bool ref_grad = grad && p.kl_on;
  // The CPU kernel's per-sample factors: d logp / d v = lp_scale * d, d loss / d v's KL term
  // gq2 * (v - v_ref).
  const Acc lp_scale = Acc(-2) * alpha * cv;
  const Acc gq2 = Acc(2) * surrogate::kl_grad(k, has_ref ? p.kl_weight[b] : Acc(0));
  const int64_t e1 = (kb + 1) * p.chunk < p.N ? (kb + 1) * p.chunk : p.N;
  const TV* v = p.v + b * p.bs_v;
  const TL* x = p.x + b * p.bs_x;
  const TL* prev = p.prev + b * p.bs_prev;
  const TV* ref = sample_of(p.ref, b, p.bs_ref);
  const int64_t base = b * p.N;  // of grad_v
  const void* old_row = row_at<Acc>(p.old, p.old_t, b * p.old_stride);
  const void* map_row = row_at<Acc>(p.amap, p.map_t, b * p.map_stride);
  const int64_t stride = kVec ? 1 : kThreads;
  const int tx = static_cast<int>(threadIdx.x);

  // s.kl carries this thread's sum of (v - v_ref)^2: the KL itself is the finalize's, per sample.
  surrogate::Sums s;
  for (int64_t e = kb * p.chunk + (kVec ? tx * V : tx); e < e1; e += kStep) {
    const int nvalid =
        kVec ? V : static_cast<int>((e1 - e + kThreads - 1) / kThreads < V
                                        ? (e1 - e + kThreads - 1) / kThreads
                                        : V);
    const int64_t i = base + e;
    // every load of the fragment issued before any arithmetic, as the backward
    Acc vv[V], xx[V], pp[V], rr[V], oo[V], mm[V];
    load_frag<kVec>(v + e, stride, nvalid, vv);
    load_frag<kVec>(x + e, stride, nvalid, xx);
    load_frag<kVec>(prev + e, stride, nvalid, pp);
    if (has_ref) load_frag<kVec>(ref + e, stride, nvalid, rr);
    load_row_frag<kVec>(old_row, p.old_t, e, stride, nvalid, oo);
    load_row_frag<kVec>(map_row, p.map_t, e, stride, nvalid, mm);
    TV out[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      // past the tail: nothing to add (policy_term adds to the sums) and nothing to store
      if (!kVec && j >= nvalid) continue;
      // The mean and the log-prob rounded step by step as the CPU kernel does (no FMA): delta =
      // logp - old cancels, so an ulp of logp is many ulps of the ratio.
      const Acc d = pp[j] - add_rn(mul_rn(cx, xx[j]), mul_rn(cv, vv[j]));
      const Acc logp = add_rn(alpha * (d * d), gamma);
      const Acc g = surrogate::policy_term(k, logp, oo[j], a_b * mm[j], s);
      if (has_ref) {
        const Acc dr = vv[j] - rr[j];
        s.kl += static_cast<double>(dr * dr);
      }
      if (grad) {
        // the grouping of the CPU kernel: d loss / d logp first, then the step's chain rule
        Acc gv = (lp_scale * (g * k.inv_n)) * d;
        if (ref_grad) gv += gq2 * (vv[j] - rr[j]);
        out[j] = Elem<TV>::from_acc(gv);
      }
    }
    if (grad) store_frag<kVec>(p.grad_v + i, stride, nvalid, out);
  }
  block_sum_sums(s);
  if (tx == 0) {
    p.part[blk] = s.policy;
    p.part[p.nprog + blk] = s.delta_sq;
    p.part[2 * p.nprog + blk] = s.clipped;
    p.part[3 * p.nprog + blk] = s.ratio;
    p.part[4 * p.nprog + blk] = s.kl;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kFinalizeThreads)
    elem_finalize_kernel(const surrogate::Constants<Acc> k, const double* __restrict__ part,
                         int64_t nprog, int64_t B, int64_t nblk, int64_t terms,
                         const Acc* __restrict__ kl_weight, Acc* __restrict__ loss,
                         Acc* __restrict__ metrics) {
  surrogate::Sums s;
  for (int64_t i = threadIdx.x; i < nprog; i += blockDim.x) {
    s.policy += part[i];
    s.delta_sq += part[nprog + i];
    s.clipped += part[2 * nprog + i];
    s.ratio += part[3 * nprog + i];
  }
  if (k.has_ref) {
    // a sample's ref_sq from its blocks in order (as the CPU's from its chunks), rounded to Acc
    // once like the ref_sq that the unfused step hands to the surrogate
    const double* part_ref = part + 4 * nprog;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      double r = 0.0;
      for (int64_t kb = 0; kb < nblk; ++kb) r += part_ref[b * nblk + kb];
      (void)surrogate::kl_term(k, static_cast<Acc>(r), kl_weight[b], s);
    }
  }
  block_sum_sums(s);
  if (threadIdx.x == 0) surrogate::finish(k, s, terms, B, loss, metrics);
}

struct ElemPlan {
  bool ok = false;
  int64_t N = 0;                // elements per sample
  int64_t chunk = 0, nblk = 0;  // per sample; nblk == 0: no main launch
  size_t bytes = 0;             // workspace: the partials [5, B*nblk] double
};

// old_log_prob's / the map's element type (kAccDType: the accumulation type); kAccDType if it is
// not one the kernel reads beside latents of type `latent`.
DType resolve_row_dtype(DType latent, DType t) {
  const DType acc = latent == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  if (t == kAccDType || t == acc) return acc;
  if (acc == DType::kFloat32 && (t == DType::kBFloat16 || t == DType::kFloat16)) return t;
  return kAccDType;
}

ElemPlan plan_elem(const FlowGrpoElemLossArgs& a) {
  ElemPlan pl;
  const int es = elem_size(a.dtype);  // of the latents: the plan of the all-latent-type run
  if (!valid_dtypes(a.dtype, a.model_dtype) || a.batch < 0 || a.channels < 0 || a.spatial < 0)
    return pl;
  if (resolve_row_dtype(a.dtype, a.old_dtype) == kAccDType ||
      resolve_row_dtype(a.dtype, a.map_dtype) == kAccDType)
    return pl;
  if (a.channels > 0 && a.spatial > INT64_MAX / a.channels) return pl;
  pl.N = a.channels * a.spatial;
  if (a.batch > 0 && pl.N > INT64_MAX / a.batch) return pl;
  if (!valid_bstride(a.model_output_bstride, a.batch, pl.N) ||
      !valid_bstride(a.sample_bstride, a.batch, pl.N) ||
      !valid_bstride(a.prev_bstride, a.batch, pl.N) ||
      !valid_bstride(a.ref_bstride, a.batch, pl.N) ||
      !valid_bstride(a.old_bstride, a.batch, pl.N) ||
      (!a.map_shared && !valid_bstride(a.map_bstride, a.batch, pl.N)))
    return pl;
  const FlatPlan f = plan_flat(a.batch, pl.N, es);
  if (a.batch * f.nblk > kMaxGrid) return pl;
  pl.ok = true;
  pl.chunk = f.chunk;
  pl.nblk = f.nblk;
  pl.bytes = static_cast<size_t>(5 * a.batch * f.nblk) * sizeof(double);
  return pl;
}

// vec_input for a row input of type t (Acc, or bfloat16 / float16 with float Acc): a 2-byte
// row's fragment is half the bytes of an Acc one, so it needs only 8-byte words beside float32
// latents (its rows then 4-element aligned).
template <int V, typename Acc>
bool vec_row(const void* p, DType t, int64_t stride) {
  if constexpr (std::is_same<Acc, float>::value) {
    if (t == DType::kBFloat16) return vec_input<V>(static_cast<const __nv_bfloat16*>(p), stride);
    if (t == DType::kFloat16) return vec_input<V>(static_cast<const __half*>(p), stride);
  }
  return vec_input<V>(static_cast<const Acc*>(p), stride);
}

template <typename TV, typename TL>
cudaError_t run_elem_loss(const FlowGrpoElemLossArgs& a, const ElemPlan& pl,
                          cudaStream_t stream) {
  using Acc = typename Elem<TL>::Acc;
  constexpr int V = kFrag<TV, TL>;
  const bool has_ref = a.kl_weight != nullptr;
  const auto k = surrogate::make_constants<Acc>(a.clip_range, a.adv_clip_max, a.beta, a.simple,
                                                has_ref, a.batch, a.batch * pl.N);
  ElemParams<TV, TL> p{};
  p.v = static_cast<const TV*>(a.model_output);
  p.x = static_cast<const TL*>(a.sample);
  p.prev = static_cast<const TL*>(a.prev_sample);
  p.ref = has_ref ? static_cast<const TV*>(a.ref_model_output) : nullptr;
  p.coefs = static_cast<const Acc*>(a.coefs);
  p.kl_weight = static_cast<const Acc*>(a.kl_weight);
  p.old = a.old_log_prob;
  p.adv = static_cast<const Acc*>(a.advantages);
  p.amap = a.advantage_map;
  p.old_t = resolve_row_dtype(a.dtype, a.old_dtype);
  p.map_t = resolve_row_dtype(a.dtype, a.map_dtype);
  p.grad_v = static_cast<TV*>(a.grad_v);
  p.part = static_cast<double*>(a.workspace);
  p.N = pl.N;
  p.bs_v = resolve_bstride(a.model_output_bstride, pl.N);
  p.bs_x = resolve_bstride(a.sample_bstride, pl.N);
  p.bs_prev = resolve_bstride(a.prev_bstride, pl.N);
  p.bs_ref = resolve_bstride(a.ref_bstride, pl.N);
  p.old_stride = resolve_bstride(a.old_bstride, pl.N);
  p.map_stride = a.map_shared ? 0 : resolve_bstride(a.map_bstride, pl.N);
  p.chunk = pl.chunk;
  p.nblk = pl.nblk;
  p.nprog = a.batch * pl.nblk;
  p.kl_on = has_ref && a.beta != 0;
  if (p.nprog > 0) {
    // 128-bit fragments: every streamed pointer aligned to its words (each sample's latents and
    // each row of old_log_prob / the map too: row strides multiples of the word's elements) and
    // whole vectors per row, which keeps a fragment of old_log_prob / the map (VEC values) whole
    // words too (16 bytes; 8 for a 2-byte row beside float32 latents).
    const bool vec = pl.N % V == 0 && vec_input<V>(p.v, p.bs_v) && vec_input<V>(p.x, p.bs_x) &&
                     vec_input<V>(p.prev, p.bs_prev) && vec_input<V>(p.ref, p.bs_ref) &&
                     vec_row<V, Acc>(p.old, p.old_t, p.old_stride) &&
                     vec_row<V, Acc>(p.amap, p.map_t, p.map_stride) &&
                     vec_input<V>(p.grad_v, 0);
    const dim3 grid(static_cast<unsigned>(p.nprog));
    if (vec) elem_loss_kernel<TV, TL, true><<<grid, kThreads, 0, stream>>>(k, p);
    else elem_loss_kernel<TV, TL, false><<<grid, kThreads, 0, stream>>>(k, p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  elem_finalize_kernel<Acc><<<1, kFinalizeThreads, 0, stream>>>(
      k, p.part, p.nprog, a.batch, pl.nblk, a.batch * pl.N, p.kl_weight,
      static_cast<Acc*>(a.loss), static_cast<Acc*>(a.metrics));
  return cudaGetLastError();
}

}  // namespace

size_t flow_grpo_map_surrogate_workspace_bytes(const FlowGrpoMapSurrogateArgs& args) {
  const MapPlan pl = plan_map(args);
  return pl.ok ? pl.bytes : 0;
}

int flow_grpo_map_surrogate_num_launches(const FlowGrpoMapSurrogateArgs& args) {
  const MapPlan pl = plan_map(args);
  return pl.ok ? (pl.nblk > 0 ? 1 : 0) + 1 : -1;
}

cudaError_t flow_grpo_map_surrogate(const FlowGrpoMapSurrogateArgs& args, cudaStream_t stream) {
  const MapPlan pl = plan_map(args);
  if (!pl.ok || (args.ref_sq == nullptr) != (args.kl_weight == nullptr) ||
      !(args.clip_range > 0) || !(args.adv_clip_max > 0) || args.loss == nullptr ||
      args.metrics == nullptr)
    return cudaErrorInvalidValue;
  if (args.batch * pl.nblk > kMaxGrid) return cudaErrorInvalidValue;
  if (args.batch > 0 && (args.advantages == nullptr || args.grad_ref_sq == nullptr))
    return cudaErrorInvalidValue;
  if (pl.nblk > 0 && (args.logp == nullptr || args.old_log_prob == nullptr ||
                      args.advantage_map == nullptr || args.workspace == nullptr))
    return cudaErrorInvalidValue;
  // No positions still launches the finalize: loss and metrics are NaN (means of nothing).
  switch (args.acc) {
    case DType::kFloat32: return run_map_surrogate<float>(args, pl, stream);
    case DType::kFloat64: return run_map_surrogate<double>(args, pl, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

size_t flow_grpo_elem_loss_workspace_bytes(const FlowGrpoElemLossArgs& args) {
  const ElemPlan pl = plan_elem(args);
  return pl.ok ? pl.bytes : 0;
}

int flow_grpo_elem_loss_num_launches(const FlowGrpoElemLossArgs& args) {
  const ElemPlan pl = plan_elem(args);
  return pl.ok ? (pl.nblk > 0 ? 1 : 0) + 1 : -1;
}

cudaError_t flow_grpo_elem_loss(const FlowGrpoElemLossArgs& args, cudaStream_t stream) {
  const ElemPlan pl = plan_elem(args);
  if (!pl.ok || (args.ref_model_output != nullptr && args.kl_weight == nullptr) ||
      !(args.clip_range > 0) || !(args.adv_clip_max > 0) || args.loss == nullptr ||
      args.metrics == nullptr)
    return cudaErrorInvalidValue;
  // The per-sample pointers whenever there are samples, the latents and [B, N] arrays only when
  // the main pass runs: a tensor with no elements may have no storage, so kl_weight alone says
  // whether there is a reference.
  if (args.batch > 0 && (args.coefs == nullptr || args.advantages == nullptr))
    return cudaErrorInvalidValue;
  if (pl.nblk > 0 && (args.model_output == nullptr || args.sample == nullptr ||
                      args.prev_sample == nullptr || args.old_log_prob == nullptr ||
                      args.advantage_map == nullptr || args.workspace == nullptr ||
                      (args.kl_weight != nullptr && args.ref_model_output == nullptr)))
    return cudaErrorInvalidValue;
  // No elements (or no samples) still launches the finalize: loss and metrics are NaN (means of
  // nothing), as on the CPU.
  return dispatch_dtypes(args.dtype, args.model_dtype, [&](auto tv, auto tl) {
    return run_elem_loss<typename decltype(tv)::type, typename decltype(tl)::type>(args, pl,
                                                                                   stream);
  });
}

size_t flow_step_forward_workspace_bytes(const FlowStepForwardArgs& args) {
  const FwdPlan pl = plan_forward(args);
  return pl.ok ? pl.bytes : 0;
}

int flow_step_forward_num_launches(const FlowStepForwardArgs& args) {
  const FwdPlan pl = plan_forward(args);
  return pl.ok ? pl.launches : -1;
}

int64_t flow_step_forward_num_blocks(const FlowStepForwardArgs& args) {
  const FwdPlan pl = plan_forward(args);
  return pl.ok ? args.batch * pl.nblk : -1;
}

cudaError_t flow_step_forward(const FlowStepForwardArgs& args, cudaStream_t stream) {
  const FwdPlan pl = plan_forward(args);
  if (!pl.ok) return cudaErrorInvalidValue;
  if (args.batch == 0) return cudaSuccess;
  // Pointers that must be set: the per-sample ones always, the latents only when the main pass
  // runs (a latent with C*S == 0 may have no storage).
  const bool main_pass = pl.nblk > 0;
  if (args.coefs == nullptr || args.ref_sq == nullptr || (main_pass && args.logp == nullptr) ||
      (args.reduction == kFlowReduceMean && args.logp == nullptr) ||
      (main_pass && (args.model_output == nullptr || args.sample == nullptr ||
                     (args.sampling && args.prev_out == nullptr) ||
                     args.workspace == nullptr)))
    return cudaErrorInvalidValue;
  return dispatch_dtypes(args.dtype, args.model_dtype, [&](auto tv, auto tl) {
    return run_forward<typename decltype(tv)::type, typename decltype(tl)::type>(args, pl, stream);
  });
}

cudaError_t flow_step_backward(const FlowStepBackwardArgs& args, cudaStream_t stream) {
  if (!valid_dtypes(args.dtype, args.model_dtype) || args.batch < 0 || args.channels < 0 ||
      args.spatial < 0 ||
      args.reduction < kFlowReduceMean || args.reduction > kFlowReduceNone)
    return cudaErrorInvalidValue;
  if (args.channels > 0 && args.spatial > INT64_MAX / args.channels) return cudaErrorInvalidValue;
  const int64_t D = args.channels * args.spatial;
  if (!valid_bstride(args.model_output_bstride, args.batch, D) ||
      !valid_bstride(args.sample_bstride, args.batch, D) ||
      !valid_bstride(args.prev_bstride, args.batch, D) ||
      !valid_bstride(args.ref_bstride, args.batch, D) ||
      !valid_bstride(args.grad_mean_bstride, args.batch, D))
    return cudaErrorInvalidValue;
  if (args.batch == 0 || D == 0) return cudaSuccess;
  if (args.model_output == nullptr || args.sample == nullptr || args.coefs == nullptr ||
      args.grad_v == nullptr)
    return cudaErrorInvalidValue;
  return dispatch_dtypes(args.dtype, args.model_dtype, [&](auto tv, auto tl) {
    return run_backward<typename decltype(tv)::type, typename decltype(tl)::type>(args, stream);
  });
}

cudaError_t flow_grpo_surrogate(const FlowGrpoSurrogateArgs& args, cudaStream_t stream) {
  if (args.batch < 0 || (args.ref_sq == nullptr) != (args.kl_weight == nullptr) ||
      !(args.clip_range > 0) || !(args.adv_clip_max > 0) || args.loss == nullptr ||
      args.metrics == nullptr)
    return cudaErrorInvalidValue;
  if (args.batch > 0 && (args.logp == nullptr || args.old_log_prob == nullptr ||
                         args.advantages == nullptr || args.factors == nullptr))
    return cudaErrorInvalidValue;
  // B == 0 still launches: the loss and metrics are NaN (means of nothing), as in PyTorch.
  switch (args.acc) {
    case DType::kFloat32: return run_surrogate<float>(args, stream);
    case DType::kFloat64: return run_surrogate<double>(args, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tbk
