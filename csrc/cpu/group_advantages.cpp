// Group-normalized advantages, C++ CPU kernel (contract and math:
// python/tbkernels/ops/_group_advantages_reference.py).
//
// Rewards are tiny next to latents (B floats per head), so the point of this kernel is not
// bandwidth but replacing the per-prompt Python loops of Flow-GRPO's PerPromptStatTracker and
// DanceGRPO with one call: all groups are normalised in one pass over a CSR view of the groups,
// parallel over groups once the problem is large enough to pay for threads.
//
// Accumulation is in double whatever the input dtype: on a CPU it costs nothing measurable here
// and makes B = 1e6 single-group sums as accurate as the float64 reference.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

namespace tbk {
namespace {

constexpr int64_t kStdGroup = 0, kStdGlobal = 1, kStdNone = 2;

// Below this many elements per parallel chunk, thread start-up costs more than the work.
constexpr int64_t kElementsPerChunk = 1 << 15;

std::string format_value(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream s;
  s << v;
  return s.str();
}

template <typename scalar_t>
void check_all_finite(const scalar_t* r, int64_t n, int64_t K) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(r[i]);
    if (!std::isfinite(v)) {
      std::ostringstream where;
      if (K > 1)
        where << "rewards[" << i / K << ", " << i % K << "]";
      else
        where << "rewards[" << i << "]";
      TORCH_CHECK_VALUE(false, "rewards must be finite: ", where.str(), " is ", format_value(v),
                        " (first non-finite element; flat index ", i,
                        "). Filter or replace failed reward evaluations before normalising.");
    }
  }
}

// kIndexed: rows come from the CSR `members`; otherwise group g is rows [g*gs, (g+1)*gs) and the
// loops are plain strided sweeps that the compiler vectorises (omp simd reductions).
template <bool kIndexed, typename scalar_t, typename stat_t>
void group_advantages_kernel(const scalar_t* r, int64_t B, int64_t K,
                             const int64_t* members,  // nullptr: group g is rows [g*gs, (g+1)*gs)
                             const int64_t* offsets,  // [G + 1] when members != nullptr
                             int64_t group_size, int64_t G, int64_t std_mode, int64_t ddof,
                             double eps, double clip, scalar_t* adv, stat_t* mean_out,
                             stat_t* std_out, int64_t* count_out) {
  // Global std per head, two-pass.
  std::vector<double> global_std(K, 0.0);
  if (std_mode == kStdGlobal) {
    for (int64_t k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t b = 0; b < B; ++b) s += static_cast<double>(r[b * K + k]);
      const double m = s / static_cast<double>(B);
      double ss = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const double d = static_cast<double>(r[b * K + k]) - m;
        ss += d * d;
      }
      global_std[k] = (B - ddof > 0) ? std::sqrt(ss / static_cast<double>(B - ddof)) : 0.0;
    }
  }

  const int64_t avg_elems_per_group = std::max<int64_t>(1, (B * K) / std::max<int64_t>(G, 1));
  const int64_t grain = std::max<int64_t>(1, kElementsPerChunk / avg_elems_per_group);

  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t begin = kIndexed ? offsets[g] : g * group_size;
      const int64_t n = kIndexed ? offsets[g + 1] - begin : group_size;
      auto row = [&](int64_t j) -> int64_t {
        if constexpr (kIndexed) return members[begin + j];
        return begin + j;
      };
      count_out[g] = n;
      for (int64_t k = 0; k < K; ++k) {
        double s = 0.0, lo = std::numeric_limits<double>::infinity(), hi = -lo;
#pragma omp simd reduction(+ : s) reduction(min : lo) reduction(max : hi)
        for (int64_t j = 0; j < n; ++j) {
          const double v = static_cast<double>(r[row(j) * K + k]);
          s += v;
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        const double m = n > 0 ? s / static_cast<double>(n) : 0.0;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < n; ++j) {
          const double d = static_cast<double>(r[row(j) * K + k]) - m;
          ss += d * d;
        }
        const double sd = (n - ddof > 0) ? std::sqrt(ss / static_cast<double>(n - ddof)) : 0.0;
        mean_out[g * K + k] = static_cast<stat_t>(m);
        std_out[g * K + k] = static_cast<stat_t>(sd);

        // A group whose rewards are all equal (n = 1 included) carries no signal: exact 0.
        // std::min/max skip a NaN, torch's amin/amax propagate it: a group holding a NaN (its
        // sum is NaN) is never flat, so its advantages are NaN as the reference's are.
        const bool flat = !(lo < hi) && !std::isnan(s);
        const double denom = std_mode == kStdGroup    ? sd + eps
                             : std_mode == kStdGlobal ? global_std[k] + eps
                                                      : 1.0;
        const double inv = 1.0 / denom;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = row(j) * K + k;
          double a = flat ? 0.0 : (static_cast<double>(r[i]) - m) * inv;
          if (clip > 0) a = std::min(std::max(a, -clip), clip);
          adv[i] = static_cast<scalar_t>(a);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& group_index, int64_t group_size,
    int64_t num_groups, int64_t std_mode, int64_t ddof, double eps, double clip,
    bool check_finite) {
  TORCH_CHECK(rewards.device().is_cpu(), "group_advantages (cpu): rewards must be a CPU tensor");
  TORCH_CHECK(rewards.dim() == 2, "group_advantages (cpu): rewards must be [B, K], got ",
              rewards.sizes());
  TORCH_CHECK(at::isFloatingType(rewards.scalar_type()),
              "group_advantages (cpu): rewards must be floating, got ", rewards.scalar_type());
  TORCH_CHECK(std_mode >= 0 && std_mode <= 2, "group_advantages: std_mode must be 0, 1 or 2");
  TORCH_CHECK(ddof == 0 || ddof == 1, "group_advantages: ddof must be 0 or 1, got ", ddof);
  TORCH_CHECK(eps >= 0, "group_advantages: eps must be >= 0, got ", eps);
  const at::Tensor r = rewards.contiguous();
  const int64_t B = r.size(0), K = r.size(1), G = num_groups;
  TORCH_CHECK(G >= 0, "group_advantages: num_groups must be >= 0");

  // Contiguous groups need no index; arbitrary ids become a CSR (counting sort by group).
  at::Tensor members, offsets;
  if (group_index.has_value()) {
    const at::Tensor gi = group_index->to(at::kLong).contiguous();
    TORCH_CHECK(gi.device().is_cpu() && gi.dim() == 1 && gi.size(0) == B,
                "group_advantages (cpu): group_index must be a CPU [B] tensor");
    const int64_t* ids = gi.data_ptr<int64_t>();
    offsets = at::zeros({G + 1}, at::kLong);
    members = at::empty({B}, at::kLong);
    int64_t* off = offsets.data_ptr<int64_t>();
    int64_t* mem = members.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_INDEX(ids[b] >= 0 && ids[b] < G, "group_advantages: group_index[", b, "] = ",
                        ids[b], " is outside [0, ", G, ")");
      ++off[ids[b] + 1];
    }
    for (int64_t g = 0; g < G; ++g) off[g + 1] += off[g];
    std::vector<int64_t> fill(off, off + G);
    for (int64_t b = 0; b < B; ++b) mem[fill[ids[b]]++] = b;
  } else {
    TORCH_CHECK(group_size > 0 && B % group_size == 0 && B / group_size == G,
                "group_advantages (cpu): contiguous groups need B % group_size == 0 and "
                "num_groups == B / group_size (B=", B, ", group_size=", group_size,
                ", num_groups=", G, ")");
  }

  const auto stat_type = r.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = at::empty_like(r);
  at::Tensor mean = at::empty({G, K}, r.options().dtype(stat_type));
  at::Tensor std = at::empty({G, K}, r.options().dtype(stat_type));
  at::Tensor count = at::empty({G}, r.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "group_advantages_cpu",
                                  [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    if (check_finite) check_all_finite(rp, B * K, K);
    const int64_t* mp = members.defined() ? members.data_ptr<int64_t>() : nullptr;
    const int64_t* op = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
    auto run = [&](auto kernel, auto* mean_p, auto* std_p) {
      kernel(rp, B, K, mp, op, group_size, G, std_mode, ddof, eps, clip,
             adv.data_ptr<scalar_t>(), mean_p, std_p, count.data_ptr<int64_t>());
    };
    if (stat_type == at::kDouble) {
      mp ? run(group_advantages_kernel<true, scalar_t, double>, mean.data_ptr<double>(), std.data_ptr<double>())
         : run(group_advantages_kernel<false, scalar_t, double>, mean.data_ptr<double>(), std.data_ptr<double>());
    } else {
      mp ? run(group_advantages_kernel<true, scalar_t, float>, mean.data_ptr<float>(), std.data_ptr<float>())
         : run(group_advantages_kernel<false, scalar_t, float>, mean.data_ptr<float>(), std.data_ptr<float>());
    }
  });
  return {adv, mean, std, count};
}

}  // namespace
}  // namespace tbk

TORCH_LIBRARY_IMPL(tbkernels, CPU, m) {
  m.impl("group_advantages", &tbk::group_advantages_cpu);
}
