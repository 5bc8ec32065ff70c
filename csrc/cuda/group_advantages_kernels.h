// Group-normalized advantages, CUDA kernels: plain C++ API over raw device pointers.
//
// Contract and math: python/tbkernels/ops/_group_advantages_reference.py. This header and its
// .cu include no torch header, so the kernels build with plain `nvcc -c` and can be reused from
// any host code; the torch binding is group_advantages_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tbk {
namespace cuda {

// Element type of rewards and advantages. Statistics (mean, std) are written as double for
// kFloat64 and float for the others; accumulation is double for kFloat32/kFloat64, float for the
// 16-bit types.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum StdMode : int { kStdGroup = 0, kStdGlobal = 1, kStdNone = 2 };

struct GroupAdvantagesArgs {
  // Inputs.
  const void* rewards = nullptr;         // [batch, heads] row-major, `dtype`
  DType dtype = DType::kFloat32;
  int64_t batch = 0;                     // B
  int64_t heads = 1;                     // K >= 1
  const int64_t* group_index = nullptr;  // [B] ids in [0, num_groups); nullptr: contiguous groups
  int64_t group_size = 1;                // contiguous groups only; batch % group_size == 0
  int64_t num_groups = 0;                // G (contiguous: batch / group_size)
  int std_mode = kStdGroup;              // StdMode
  int ddof = 0;                          // 0 or 1
  double eps = 0.0;                      // added to the std
  double clip = 0.0;                     // > 0: clamp advantages to [-clip, clip]

  // Outputs (device memory).
  void* adv = nullptr;         // [B, K], `dtype`
  void* mean = nullptr;        // [G, K], double for kFloat64 else float
  void* std_out = nullptr;     // [G, K], same type as mean; always the group std
  int64_t* count = nullptr;    // [G]
  // Minimum flat index b*K + k of a NaN/inf reward is atomicMin'ed here. The caller initialises
  // it to INT64_MAX before the call; nullptr skips the check.
  int64_t* first_bad = nullptr;

  // Scratch of group_advantages_workspace_bytes(args) bytes (any contents, 256-byte aligned;
  // may be nullptr when that is 0).
  void* workspace = nullptr;
};

// Bytes of scratch `group_advantages` needs for these sizes and modes (pointers are ignored).
// Returns 0 for inconsistent arguments (group_advantages then reports cudaErrorInvalidValue).
size_t group_advantages_workspace_bytes(const GroupAdvantagesArgs& args);

// Kernel launches `group_advantages` will issue for these arguments (0 for an empty problem,
// -1 for inconsistent arguments). For tests and benchmarks of the launch structure.
int group_advantages_num_launches(const GroupAdvantagesArgs& args);

// Enqueues the computation on `stream`; returns the first launch error, or
// cudaErrorInvalidValue for inconsistent arguments. Group ids outside [0, G) are not checked
// on the device: their rows are left out of every statistic and get a NaN advantage.
cudaError_t group_advantages(const GroupAdvantagesArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tbk
