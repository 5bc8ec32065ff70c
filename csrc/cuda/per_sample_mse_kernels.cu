// Per-sample mean squared error, CUDA kernels (contract: csrc/cpu/per_sample_mse.cpp; API:
// per_sample_mse_kernels.h).
//
// Purely bandwidth-bound (3 FLOPs per element, two tensors streamed once), so the kernels are
// built around coalesced, wide loads:
//
//   * a thread's fragment is 4 consecutive elements. Where both rows allow it (pointers aligned
//     to 4 elements of their type and D a multiple of 4) the fragment is one aligned 4-element
//     load per tensor (16 bytes for float32, 8 for 16-bit types, 2x16 for float64); otherwise
//     ("scalar" instantiation) the 4 elements are strided by the block width, read with
//     coalesced scalar loads and masked at the tail. Both cover the same index ranges, so the
//     launch geometry and the workspace never depend on alignment.
//   * pred and target may have different types (a bf16 model output against a float32 target):
//     every (pred, target) pair of the four types is instantiated.
//   * accumulation in float (double when either input is double); each block writes its partial
//     sum as a double into the workspace [B, nblk] and a finalize kernel adds a sample's partials
//     in a fixed order: bitwise reproducible.
//
// Launch structure (B samples, D elements each, step = 256 * 4 elements):
//   forward:  mse_partial_kernel   grid B*nblk x 256; block (b, k) sums elements
//                                  [k*chunk, (k+1)*chunk) of sample b
//          -> mse_finalize_kernel  grid B x 256: out[b] = sum of partials / D
//   backward: mse_backward_kernel  grid B*nblk x 256, same chunks, no workspace
// chunk = min(clamp(ceil(ceil(B*D / 4096) / step), 1, 64) * step, ceil(D / step) * step),
// nblk = ceil(D / chunk): about 4096 blocks over the batch (several waves on 132 SMs), longer
// chunks rather than more partials for big latents. Workspace: round_up(B*nblk*8, 256) bytes.
#include "per_sample_mse_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace tbk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFrag = 4;  // elements per thread fragment
constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kFrag;
constexpr int64_t kTargetBlocks = 4096;
constexpr int64_t kMaxSteps = 64;
constexpr int kFinalizeThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;
constexpr size_t kAlign = 256;

// ------------------------------------------------------------------------------------------
// Element types.

template <typename T>
struct Tag {
  using type = T;
};

__device__ __forceinline__ float to_wide(float v) { return v; }
__device__ __forceinline__ double to_wide(double v) { return v; }
__device__ __forceinline__ float to_wide(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_wide(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Out;
template <>
struct Out<float> {
  __device__ static __forceinline__ float cvt(float v) { return v; }
  __device__ static __forceinline__ float cvt(double v) { return static_cast<float>(v); }
};
template <>
struct Out<double> {
  __device__ static __forceinline__ double cvt(float v) { return v; }
  __device__ static __forceinline__ double cvt(double v) { return v; }
};
template <>
struct Out<__half> {
  __device__ static __forceinline__ __half cvt(float v) { return __float2half_rn(v); }
  __device__ static __forceinline__ __half cvt(double v) { return __double2half(v); }
};
template <>
struct Out<__nv_bfloat16> {
  __device__ static __forceinline__ __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
  __device__ static __forceinline__ __nv_bfloat16 cvt(double v) { return __double2bfloat16(v); }
};

// Four consecutive elements, aligned so that one fragment is one (or, for double, two) wide
// memory transactions.
template <typename T>
struct alignas(kFrag * sizeof(T)) Frag {
  T v[kFrag];
};

template <bool kVec, typename Acc, typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, int64_t stride, int nvalid,
                                      Acc (&out)[kFrag]) {
  if constexpr (kVec) {
    const Frag<T> f = *reinterpret_cast<const Frag<T>*>(p);
#pragma unroll
    for (int j = 0; j < kFrag; ++j) out[j] = static_cast<Acc>(to_wide(f.v[j]));
  } else {
#pragma unroll
    for (int j = 0; j < kFrag; ++j)
      out[j] = j < nvalid ? static_cast<Acc>(to_wide(p[j * stride])) : Acc(0);
  }
}

template <bool kVec, typename Acc, typename T>
__device__ __forceinline__ void store4(T* __restrict__ p, int64_t stride, int nvalid,
                                       const Acc (&in)[kFrag]) {
  if constexpr (kVec) {
    Frag<T> f;
#pragma unroll
    for (int j = 0; j < kFrag; ++j) f.v[j] = Out<T>::cvt(in[j]);
    *reinterpret_cast<Frag<T>*>(p) = f;
  } else {
#pragma unroll
    for (int j = 0; j < kFrag; ++j)
      if (j < nvalid) p[j * stride] = Out<T>::cvt(in[j]);
  }
}

// Block-wide sum of a (blockDim.x a multiple of 32, at most 1024); valid in thread 0. A fixed
// shuffle tree: deterministic.
template <typename A>
__device__ __forceinline__ A block_sum(A a) {
  __shared__ A sm[kWarp];
  const int t = static_cast<int>(threadIdx.x);
  const int nwarps = static_cast<int>(blockDim.x) / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) a += __shfl_xor_sync(kFullMask, a, off);
  const int lane = t & (kWarp - 1), warp = t / kWarp;
  if (lane == 0) sm[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sm[lane] : A(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) a += __shfl_xor_sync(kFullMask, a, off);
  }
  return a;
}

struct Plan {
  int64_t chunk = 0, nblk = 0;
};

// Fragment geometry of thread tx in [e, e1): first element and how many of its 4 are valid.
__device__ __forceinline__ int frag_valid(bool vec, int64_t e, int64_t e1) {
  if (vec) return kFrag;
  const int64_t n = (e1 - e + kThreads - 1) / kThreads;
  return static_cast<int>(n < kFrag ? n : kFrag);
}

// ------------------------------------------------------------------------------------------
// Kernels.

template <typename P, typename T, typename Acc, bool kVec>
__global__ void __launch_bounds__(kThreads)
    mse_partial_kernel(const P* __restrict__ pred, const T* __restrict__ target,
                       double* __restrict__ part, int64_t D, int64_t chunk, int64_t nblk) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / nblk, k = blk - b * nblk;
  const int64_t e1 = (k + 1) * chunk < D ? (k + 1) * chunk : D;
  const int64_t base = b * D;
  const int64_t stride = kVec ? 1 : kThreads;
  const int tx = static_cast<int>(threadIdx.x);
  Acc s = 0;
  for (int64_t e = k * chunk + (kVec ? tx * kFrag : tx); e < e1; e += kStep) {
    const int nvalid = frag_valid(kVec, e, e1);
    Acc pp[kFrag], tt[kFrag];
    load4<kVec>(pred + base + e, stride, nvalid, pp);
    load4<kVec>(target + base + e, stride, nvalid, tt);
#pragma unroll
    for (int j = 0; j < kFrag; ++j) {
      const Acc d = pp[j] - tt[j];  // masked lanes read 0 - 0
      s += d * d;
    }
  }
  s = block_sum(s);
  if (tx == 0) part[blk] = static_cast<double>(s);
}

template <typename Acc>
__global__ void __launch_bounds__(kFinalizeThreads)
    mse_finalize_kernel(const double* __restrict__ part, Acc* __restrict__ out, int64_t nblk,
                        double D) {
  const int64_t b = blockIdx.x;
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < nblk; k += blockDim.x) s += part[b * nblk + k];
  s = block_sum(s);
  if (threadIdx.x == 0) out[b] = static_cast<Acc>(s / D);  // D == 0: 0/0 = NaN, as torch
}

template <typename P, typename T, typename Acc, bool kVec>
__global__ void __launch_bounds__(kThreads)
    mse_backward_kernel(const Acc* __restrict__ grad_out, const P* __restrict__ pred,
                        const T* __restrict__ target, P* __restrict__ grad, int64_t D,
                        int64_t chunk, int64_t nblk) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / nblk, k = blk - b * nblk;
  const int64_t e1 = (k + 1) * chunk < D ? (k + 1) * chunk : D;
  const int64_t base = b * D;
  const int64_t stride = kVec ? 1 : kThreads;
  const int tx = static_cast<int>(threadIdx.x);
  // d mean(d^2) / d pred_e = 2 d_e / D: the per-sample factor in double, rounded once (as the
  // CPU kernel does).
  const Acc scale =
      static_cast<Acc>(2.0 * static_cast<double>(grad_out[b]) / static_cast<double>(D));
  for (int64_t e = k * chunk + (kVec ? tx * kFrag : tx); e < e1; e += kStep) {
    const int nvalid = frag_valid(kVec, e, e1);
    Acc pp[kFrag], tt[kFrag], g[kFrag];
    load4<kVec>(pred + base + e, stride, nvalid, pp);
    load4<kVec>(target + base + e, stride, nvalid, tt);
#pragma unroll
    for (int j = 0; j < kFrag; ++j) g[j] = scale * (pp[j] - tt[j]);
    store4<kVec>(grad + base + e, stride, nvalid, g);
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

bool valid_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat64 || d == DType::kFloat16 ||
         d == DType::kBFloat16;
}

template <typename F>
cudaError_t with_type(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(Tag<P>, Tag<T>, Tag<Acc>).
template <typename F>
cudaError_t with_types(DType p, DType t, F&& f) {
  return with_type(p, [&](auto pt) {
    return with_type(t, [&](auto tt) {
      using P = typename decltype(pt)::type;
      using T = typename decltype(tt)::type;
      constexpr bool kDouble =
          sizeof(P) == sizeof(double) || sizeof(T) == sizeof(double);  // only double is 8 bytes
      using Acc = typename std::conditional<kDouble, double, float>::type;
      return f(pt, tt, Tag<Acc>{});
    });
  });
}

bool sizes_ok(int64_t B, int64_t D) {
  return B >= 0 && D >= 0 && (B == 0 || D <= INT64_MAX / B);
}

Plan plan(int64_t B, int64_t D) {
  Plan p;
  if (B == 0 || D == 0) return p;
  const int64_t total = B * D;
  const int64_t per_block = (total + kTargetBlocks - 1) / kTargetBlocks;
  int64_t steps = (per_block + kStep - 1) / kStep;
  steps = steps < 1 ? 1 : (steps > kMaxSteps ? kMaxSteps : steps);
  const int64_t whole = (D + kStep - 1) / kStep * kStep;
  p.chunk = steps * kStep < whole ? steps * kStep : whole;
  p.nblk = (D + p.chunk - 1) / p.chunk;
  return p;
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace

int64_t per_sample_mse_forward_num_blocks(const PerSampleMseForwardArgs& a) {
  if (!sizes_ok(a.batch, a.per_sample) || !valid_dtype(a.pred_dtype) ||
      !valid_dtype(a.target_dtype))
    return -1;
  const Plan p = plan(a.batch, a.per_sample);
  return a.batch * p.nblk;
}

int per_sample_mse_forward_num_launches(const PerSampleMseForwardArgs& a) {
  const int64_t blocks = per_sample_mse_forward_num_blocks(a);
  if (blocks < 0) return -1;
  if (a.batch == 0) return 0;
  return blocks > 0 ? 2 : 1;
}

size_t per_sample_mse_forward_workspace_bytes(const PerSampleMseForwardArgs& a) {
  const int64_t blocks = per_sample_mse_forward_num_blocks(a);
  if (blocks <= 0) return 0;
  const size_t bytes = static_cast<size_t>(blocks) * sizeof(double);
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

cudaError_t per_sample_mse_forward(const PerSampleMseForwardArgs& a, cudaStream_t stream) {
  const int64_t blocks = per_sample_mse_forward_num_blocks(a);
  if (blocks < 0 || blocks > kMaxGrid || a.batch > kMaxGrid) return cudaErrorInvalidValue;
  if (a.batch == 0) return cudaSuccess;
  if (a.out == nullptr) return cudaErrorInvalidValue;
  if (blocks > 0 && (a.pred == nullptr || a.target == nullptr || a.workspace == nullptr))
    return cudaErrorInvalidValue;
  const Plan p = plan(a.batch, a.per_sample);
  return with_types(a.pred_dtype, a.target_dtype, [&](auto pt, auto tt, auto at) {
    using P = typename decltype(pt)::type;
    using T = typename decltype(tt)::type;
    using Acc = typename decltype(at)::type;
    double* part = static_cast<double*>(a.workspace);
    if (blocks > 0) {
      const P* pred = static_cast<const P*>(a.pred);
      const T* target = static_cast<const T*>(a.target);
      const bool vec = a.per_sample % kFrag == 0 && aligned(pred, kFrag * sizeof(P)) &&
                       aligned(target, kFrag * sizeof(T));
      if (vec) {
        mse_partial_kernel<P, T, Acc, true><<<static_cast<unsigned>(blocks), kThreads, 0,
                                              stream>>>(pred, target, part, a.per_sample,
                                                        p.chunk, p.nblk);
      } else {
        mse_partial_kernel<P, T, Acc, false><<<static_cast<unsigned>(blocks), kThreads, 0,
                                               stream>>>(pred, target, part, a.per_sample,
                                                         p.chunk, p.nblk);
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    mse_finalize_kernel<Acc><<<static_cast<unsigned>(a.batch), kFinalizeThreads, 0, stream>>>(
        part, static_cast<Acc*>(a.out), p.nblk, static_cast<double>(a.per_sample));
    return cudaGetLastError();
  });
}

cudaError_t per_sample_mse_backward(const PerSampleMseBackwardArgs& a, cudaStream_t stream) {
  if (!sizes_ok(a.batch, a.per_sample) || !valid_dtype(a.pred_dtype) ||
      !valid_dtype(a.target_dtype))
    return cudaErrorInvalidValue;
  const Plan p = plan(a.batch, a.per_sample);
  const int64_t blocks = a.batch * p.nblk;
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  if (a.grad_out == nullptr || a.pred == nullptr || a.target == nullptr || a.grad_pred == nullptr)
    return cudaErrorInvalidValue;
  return with_types(a.pred_dtype, a.target_dtype, [&](auto pt, auto tt, auto at) {
    using P = typename decltype(pt)::type;
    using T = typename decltype(tt)::type;
    using Acc = typename decltype(at)::type;
    const P* pred = static_cast<const P*>(a.pred);
    const T* target = static_cast<const T*>(a.target);
    P* grad = static_cast<P*>(a.grad_pred);
    const Acc* g = static_cast<const Acc*>(a.grad_out);
    const bool vec = a.per_sample % kFrag == 0 && aligned(pred, kFrag * sizeof(P)) &&
                     aligned(target, kFrag * sizeof(T)) && aligned(grad, kFrag * sizeof(P));
    if (vec) {
      mse_backward_kernel<P, T, Acc, true><<<static_cast<unsigned>(blocks), kThreads, 0,
                                             stream>>>(g, pred, target, grad, a.per_sample,
                                                       p.chunk, p.nblk);
    } else {
      mse_backward_kernel<P, T, Acc, false><<<static_cast<unsigned>(blocks), kThreads, 0,
                                              stream>>>(g, pred, target, grad, a.per_sample,
                                                        p.chunk, p.nblk);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace tbk
