// Group-normalized advantages: torch binding of the CUDA kernels (contract and math:
// python/tbkernels/ops/_group_advantages_reference.py; kernels: group_advantages_kernels.cu).
//
// Built only when torch has CUDA. Outputs, workspace and the non-finite slot come from torch's
// caching allocator (no cudaMalloc per call) and everything runs on the current stream; with
// check_finite=false there is no host sync either, so the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "binding_scratch.h"
#include "group_advantages_kernels.h"

namespace tbk {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "group_advantages (cuda): rewards must be float32, float64, float16 or "
                  "bfloat16, got ", t);
  }
  return cuda::DType::kFloat32;  // unreachable
}

// As Python prints a float (the CPU backend and the reference word it the same way).
std::string format_value(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cuda(
    const at::Tensor& rewards, const std::optional<at::Tensor>& group_index, int64_t group_size,
    int64_t num_groups, int64_t std_mode, int64_t ddof, double eps, double clip,
    bool check_finite) {
  TORCH_CHECK(rewards.is_cuda(), "group_advantages (cuda): rewards must be a CUDA tensor, got ",
              rewards.device());
  TORCH_CHECK(rewards.dim() == 2, "group_advantages (cuda): rewards must be [B, K], got shape ",
              rewards.sizes());
  TORCH_CHECK(rewards.is_contiguous(), "group_advantages (cuda): rewards must be contiguous");
  const cuda::DType dtype = kernel_dtype(rewards.scalar_type());
  const int64_t B = rewards.size(0);
  const int64_t K = rewards.size(1);
  TORCH_CHECK(K >= 1, "group_advantages (cuda): rewards needs at least one head (K >= 1)");
  TORCH_CHECK_VALUE(std_mode >= 0 && std_mode <= 2,
                    "group_advantages (cuda): std_mode must be 0, 1 or 2, got ", std_mode);
  TORCH_CHECK_VALUE(ddof == 0 || ddof == 1,
                    "group_advantages (cuda): ddof must be 0 or 1, got ", ddof);
  TORCH_CHECK_VALUE(num_groups >= 0, "group_advantages (cuda): num_groups must be >= 0, got ",
                    num_groups);

  c10::cuda::CUDAGuard guard(rewards.device());

  at::Tensor index;  // keeps a contiguous copy alive for the launch
  if (group_index.has_value()) {
    index = *group_index;
    TORCH_CHECK(index.device() == rewards.device(),
                "group_advantages (cuda): group_index must be on ", rewards.device(), ", got ",
                index.device());
    TORCH_CHECK(index.scalar_type() == at::kLong,
                "group_advantages (cuda): group_index must be int64, got ", index.scalar_type());
    TORCH_CHECK(index.dim() == 1 && index.size(0) == B,
                "group_advantages (cuda): group_index must be [B] = [", B, "], got shape ",
                index.sizes());
    TORCH_CHECK_VALUE(B == 0 || num_groups >= 1,
                      "group_advantages (cuda): num_groups must be >= 1 when there are rewards");
    index = index.contiguous();
  } else {
    TORCH_CHECK_VALUE(group_size >= 1,
                      "group_advantages (cuda): group_size must be >= 1, got ", group_size);
    TORCH_CHECK_VALUE(B % group_size == 0, "group_advantages (cuda): B = ", B,
                      " is not a multiple of group_size = ", group_size);
    TORCH_CHECK_VALUE(num_groups == B / group_size, "group_advantages (cuda): num_groups = ",
                      num_groups, " but B / group_size = ", B / group_size);
  }

  const auto stat_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = at::empty_like(rewards);
  at::Tensor mean = at::empty({num_groups, K}, rewards.options().dtype(stat_dtype));
  at::Tensor sd = at::empty({num_groups, K}, rewards.options().dtype(stat_dtype));
  at::Tensor count = at::empty({num_groups}, rewards.options().dtype(at::kLong));

  cuda::GroupAdvantagesArgs args;
  args.rewards = rewards.data_ptr();
  args.dtype = dtype;
  args.batch = B;
  args.heads = K;
  args.group_index = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  args.group_size = group_size;
  args.num_groups = num_groups;
  args.std_mode = static_cast<int>(std_mode);
  args.ddof = static_cast<int>(ddof);
  args.eps = eps;
  args.clip = clip;
  args.adv = adv.data_ptr();
  args.mean = mean.data_ptr();
  args.std_out = sd.data_ptr();
  args.count = count.data_ptr<int64_t>();

  const at::Tensor workspace =  // alive until the kernels are queued
      cuda_scratch(cuda::group_advantages_workspace_bytes(args), rewards, &args.workspace);
  constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();
  at::Tensor first_bad;
  if (check_finite && B > 0) {
    first_bad = at::full({1}, kNoBad, rewards.options().dtype(at::kLong));
    args.first_bad = first_bad.data_ptr<int64_t>();
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::group_advantages(args, stream));

  if (first_bad.defined()) {
    const int64_t bad = first_bad.item<int64_t>();  // the one device sync of check_finite
    if (bad != kNoBad) {
      const double value = rewards.reshape({-1})[bad].item<double>();
      std::ostringstream where;
      if (K > 1)
        where << "rewards[" << bad / K << ", " << bad % K << "]";
      else
        where << "rewards[" << bad << "]";
      TORCH_CHECK_VALUE(false, "rewards must be finite: ", where.str(), " is ",
                        format_value(value), " (first non-finite element; flat index ", bad,
                        "). Filter or replace failed reward evaluations before normalising.");
    }
  }
  return {adv, mean, sd, count};
}

}  // namespace tbk

TORCH_LIBRARY_IMPL(tbkernels, CUDA, m) {
  m.impl("group_advantages", &tbk::group_advantages_cuda);
}
