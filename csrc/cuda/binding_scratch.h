// Kernel scratch for the CUDA torch bindings (csrc/cuda/*_cuda.cpp): a byte tensor from torch's
// caching allocator on `like`'s device, kept alive by the caller until the kernels are queued
// (the allocator orders its reuse on the current stream). Header-only, torch-side only.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace tbk {

// `bytes` of scratch on like's device (an undefined tensor and *ptr = nullptr for 0 bytes).
inline at::Tensor cuda_scratch(size_t bytes, const at::Tensor& like, void** ptr) {
  if (bytes == 0) {
    *ptr = nullptr;
    return at::Tensor();
  }
  at::Tensor t = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  *ptr = t.data_ptr();
  return t;
}

}  // namespace tbk
