// Per-sample mean squared error over whole latents, CUDA kernels: plain C++ API over raw device
// pointers.
//
// Contract and math: csrc/cpu/per_sample_mse.cpp (schemas and the CPU kernels this reproduces),
// python/tbkernels/ops/dpo.py. This header and its .cu include no torch header, so the kernels
// build with plain `nvcc -c`; the torch binding is per_sample_mse_cuda.cpp.
//
// pred and target are contiguous [B, D] (D = elements per sample), each of its own DType:
//   forward:  out[b]     = (1/D) sum_e (pred[b,e] - target[b,e])^2
//   backward: grad[b, e] = (2 grad_out[b] / D) (pred[b,e] - target[b,e])     (pred's DType)
// "Acc" below (out, grad_out, the arithmetic) is double when either input is kFloat64, else
// float.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "group_advantages_kernels.h"  // tbk::cuda::DType (shared element-type enum)

namespace tbk {
namespace cuda {

struct PerSampleMseForwardArgs {
  DType pred_dtype = DType::kFloat32;
  DType target_dtype = DType::kFloat32;
  int64_t batch = 0;       // B
  int64_t per_sample = 0;  // D (0: every out[b] is NaN, a mean over no elements)

  const void* pred = nullptr;    // [B, D] pred_dtype, device memory
  const void* target = nullptr;  // [B, D] target_dtype
  void* out = nullptr;           // [B] Acc

  // Scratch of per_sample_mse_forward_workspace_bytes(args) bytes (any contents, 256-byte
  // aligned; may be nullptr when that is 0): one double partial sum per block, combined per
  // sample in a fixed order, so results are bitwise deterministic (no atomics).
  void* workspace = nullptr;
};

struct PerSampleMseBackwardArgs {
  DType pred_dtype = DType::kFloat32;
  DType target_dtype = DType::kFloat32;
  int64_t batch = 0, per_sample = 0;  // B, D

  const void* grad_out = nullptr;  // [B] Acc
  const void* pred = nullptr;      // [B, D] pred_dtype
  const void* target = nullptr;    // [B, D] target_dtype
  void* grad_pred = nullptr;       // [B, D] pred_dtype, always fully written
};

// Bytes of scratch per_sample_mse_forward needs (pointers are ignored; 0 for inconsistent
// arguments, which per_sample_mse_forward then reports as cudaErrorInvalidValue).
size_t per_sample_mse_forward_workspace_bytes(const PerSampleMseForwardArgs& args);

// Blocks of the forward's main pass (0 for B == 0 or D == 0, -1 for inconsistent arguments), and
// the kernel launches it issues (main pass + finalize; only the finalize when D == 0).
int64_t per_sample_mse_forward_num_blocks(const PerSampleMseForwardArgs& args);
int per_sample_mse_forward_num_launches(const PerSampleMseForwardArgs& args);

// Enqueue on `stream`; return the first launch error, or cudaErrorInvalidValue for inconsistent
// arguments (negative sizes, unknown dtype, a missing pointer). Forward: 2 launches (1 when
// D == 0, 0 when B == 0). Backward: 1 elementwise launch (0 for an empty problem), no scratch.
cudaError_t per_sample_mse_forward(const PerSampleMseForwardArgs& args, cudaStream_t stream);
cudaError_t per_sample_mse_backward(const PerSampleMseBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tbk
