// Op schemas of tbkernels and the tiny Python module `tbkernels._C`.
//
// Schemas are defined once here; each backend registers its kernel for its dispatch key in its
// own file (csrc/cpu/*.cpp for CPU, csrc/cuda/*_cuda.cpp for CUDA). Fake (meta) implementations
// and autograd live in Python next to each op's wrapper (python/tbkernels/ops/).
#include <torch/extension.h>

TORCH_LIBRARY(tbkernels, m) {
  // rewards [B, K] contiguous floating; group_index [B] int64 dense ids in [0, num_groups) or
  // None for contiguous groups of group_size. Returns (adv [B, K] rewards.dtype,
  // mean [G, K], std [G, K] (float64 for float64 rewards, else float32), count [G] int64).
  m.def(
      "group_advantages(Tensor rewards, Tensor? group_index, SymInt group_size, SymInt num_groups, "
      "int std_mode, int ddof, float eps, float clip, bool check_finite) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {
bool built_with_cuda() {
#ifdef TBK_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tbkernels compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
}
