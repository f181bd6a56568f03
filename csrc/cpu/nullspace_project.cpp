// Batched projection onto the left null space of J (Vernekar et al. 2019, type-I outliers), on CPU.
//
// Per sample (jac [D, d], r [D]):
//   G = J^T J and b = J^T r, accumulated in float64 (products of float32 values are exact in float64);
//   delta = kRidge * trace(G) / d + kRidgeFloor;  L L^T = G + delta I  (Cholesky, float64);
//   a = (G + delta I)^-1 b, refined kRefinements times by a += (G + delta I)^-1 (b - G a)  (in d-space only);
//   p = r - J a (float64), v = p / |p|  (|p| == 0 -> v = 0).
// The refinements remove the ridge's bias along every direction of J whose squared singular value is well above
// delta, so rank-deficient or ill-conditioned J stay finite: directions with squared singular values far below
// delta are treated as absent (not projected out). NaN or Inf in a sample's jac or r gives a NaN row. Samples
// whose Gram matrix or |p|^2 would leave [1e-200, 1e200] (entries beyond ~1e+-100; |p|^2 in [1e-60, 1e60] for
// float32 outputs) are rescaled by powers of two first (the projection does not depend on the scale of J or r),
// applied with ldexp so that subnormal entries scale too.
//
// Layout: J is read in tiles of rows converted to float64 and zero-padded to dp columns (a multiple of
// kRowBlock: 8 with AVX-512). The Gram matrix is built from rank-1 row updates in register blocks of 8 rows x up
// to 24 columns of G (vector accumulators that stay in registers); the residual p = r - J a is formed 8 rows at
// a time. A tile holds the whole sample when it fits in 1 MB, so pass 2 reads J from cache. The math is compiled
// once per CPU capability (cpu/kernels/nullspace_impl.h, register blocks sized to the capability's vectors); this
// file holds the op and splits the batch over threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/dispatch.h"

namespace fastood {
namespace {

template <typename scalar_t>
void nullspace_project_forward_kernel(const scalar_t* jac, const scalar_t* r, scalar_t* out, int64_t batch,
                                      int64_t dim, int64_t d) {
  // The CPU capability's kernel (cpu/kernels/nullspace_impl.h). About dim * dp^2 / 2 float64 FMAs per sample; a
  // task should hold at least ~1/4 M of them (~0.1 ms).
  const cpu::KernelTable& table = cpu::kernels();
  const int64_t dp = (d + 7) / 8 * 8;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(dim * dp * (dp / 2 + 2), 1));
  const int64_t work_size = table.nullspace_workspace_doubles(d, dim);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> work(static_cast<size_t>(work_size), 0.0);
    table.nullspace_project_samples(std::is_same<scalar_t, double>::value, jac, r, out, begin, end, dim, d,
                                    work.data());
  });
}
at::Tensor nullspace_project_cpu(const at::Tensor& jac_in, const at::Tensor& r_in) {
  check_nullspace(jac_in, r_in, kMaxLatent);
  const at::Tensor jac = jac_in.contiguous(), r = r_in.contiguous();
  at::Tensor out = at::empty(r.sizes(), r.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "nullspace_project", [&] {
    nullspace_project_forward_kernel<scalar_t>(jac.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                                               out.data_ptr<scalar_t>(), jac.size(0), jac.size(1), jac.size(2));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) { m.impl("nullspace_project", &nullspace_project_cpu); }

}  // namespace fastood
