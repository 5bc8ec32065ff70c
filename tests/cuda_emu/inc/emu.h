// Minimal cooperative SIMT emulator: runs CUDA kernels on the CPU, one fiber per thread,
// blocks sequentially. Strict: any barrier / warp-op mismatch is reported as a deadlock.
#pragma once
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.x, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.x << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u; std::memcpy(&u, &v, 4); __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) { b.x = (unsigned short)((u >> 16) | 0x40); return b; }
  u += 0x7fffu + ((u >> 16) & 1u); b.x = (unsigned short)(u >> 16); return b;
}

// Double to half / bfloat16 in one rounding (round to nearest even), as the device intrinsics.
inline __half __double2half(double v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.x, &f, 2); return h; }
inline __nv_bfloat16 __double2bfloat16(double v) {
  // Narrow to float by round-to-odd (truncate, then set the last bit if anything was dropped),
  // which makes the following float -> bfloat16 round-to-nearest-even exact for the double.
  float f = (float)v;
  if (std::isfinite(v) && (double)f != v) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if (std::fabs((double)f) > std::fabs(v)) u -= 1;   // round toward zero first
    u |= 1u;
    std::memcpy(&f, &u, 4);
  }
  return __float2bfloat16_rn(f);
}

struct alignas(16) uint4 { unsigned x, y, z, w; };
template <class T> inline T __ldg(const T* p) { return *p; }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
inline long long __double_as_longlong(double f) { long long i; std::memcpy(&i, &f, 8); return i; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

template <class T> inline T atomicMin(T* p, T v) { T o = *p; if (v < o) *p = v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; if (v > o) *p = v; return o; }
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }

namespace emu {
enum State { READY, WAIT_BLOCK, WAIT_WARP, DONE };
// One CUDA thread: its (x, y, z) index, and its linear index in the block, which is what warps
// are cut from (lanes 0-31 are linear indices 0-31, and so on), as on the hardware.
struct Fiber { ucontext_t ctx; uint3 tid; unsigned linear; State st; unsigned char slot[8]; };
extern Fiber* g_cur;
extern ucontext_t g_sched;
extern uint3 g_blk;
extern dim3 g_bdim, g_gdim;
extern std::vector<Fiber> g_fibers;
extern long long g_ops;
inline Fiber* cur() { return g_cur; }
inline void yield_as(State s) { g_cur->st = s; swapcontext(&g_cur->ctx, &g_sched); }
inline int lane() { return (int)(g_cur->linear & 31); }
inline Fiber& lane_fiber(int l) { return g_fibers[(g_cur->linear & ~31u) + l]; }

template <class V> V exchange(unsigned mask, V v, int src) {
  if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial mask\n"); std::abort(); }
  static_assert(sizeof(V) <= 8, "");
  std::memcpy(g_cur->slot, &v, sizeof(V));
  yield_as(WAIT_WARP);  // all lanes deposited
  V r; std::memcpy(&r, lane_fiber(src).slot, sizeof(V));
  yield_as(WAIT_WARP);  // all lanes read
  ++g_ops;
  return r;
}
void launch_impl(dim3 grid, dim3 block, const std::function<void()>& body);
struct Cfg { dim3 g, b; };
inline Cfg cfg(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) { return {g, b}; }
template <class... KA, class... A> void launch(Cfg c, void (*k)(KA...), A&&... a) {
  std::function<void()> body = [=]() { k(a...); };
  launch_impl(c.g, c.b, body);
}
}  // namespace emu

#define threadIdx (::emu::cur()->tid)
#define blockIdx (::emu::g_blk)
#define blockDim (::emu::g_bdim)
#define gridDim (::emu::g_gdim)

inline void __syncthreads() { ::emu::yield_as(::emu::WAIT_BLOCK); }
template <class V> V __shfl_xor_sync(unsigned m, V v, int off, int w = 32) {
  (void)w; return ::emu::exchange(m, v, ::emu::lane() ^ off);
}
template <class V> V __shfl_up_sync(unsigned m, V v, unsigned d, int w = 32) {
  (void)w; int l = ::emu::lane(); return ::emu::exchange(m, v, l - (int)d >= 0 ? l - (int)d : l);
}
template <class V> V __shfl_sync(unsigned m, V v, int src, int w = 32) { (void)w; return ::emu::exchange(m, v, src & 31); }
// Separately rounded (never contracted into an FMA) products and sums, as the _rn intrinsics.
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
template <class V> V __shfl_down_sync(unsigned m, V v, unsigned d, int w = 32) {
  (void)w; int l = ::emu::lane(); return ::emu::exchange(m, v, l + (int)d < 32 ? l + (int)d : l);
}
inline unsigned __ballot_sync(unsigned m, int pred) {
  if (m != 0xffffffffu) { std::fprintf(stderr, "emu: partial mask\n"); std::abort(); }
  unsigned mine = pred ? 1u : 0u;
  std::memcpy(::emu::g_cur->slot, &mine, 4);
  ::emu::yield_as(::emu::WAIT_WARP);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) { unsigned v; std::memcpy(&v, ::emu::lane_fiber(l).slot, 4); r |= (v & 1u) << l; }
  ::emu::yield_as(::emu::WAIT_WARP);
  return r;
}
