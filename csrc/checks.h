// Input checks shared by the CPU and CUDA entry points: every message names the argument, what was
// expected and what was given.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastood {

inline void check_floating(const at::Tensor& t, const char* name, bool allow_half) {
  auto dt = t.scalar_type();
  bool ok = dt == at::kFloat || dt == at::kDouble || (allow_half && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK(ok, name, " must have dtype ", allow_half ? "float16, bfloat16, float32 or float64" : "float32 or float64",
              ", got ", dt);
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
}

// Checks of the row ops (modified energy, softmax entropy): logits [B, C].
inline void check_logits(const at::Tensor& logits) {
  check_dim(logits, "logits", 2, "[B, C]");
  check_floating(logits, "logits", /*allow_half=*/true);
}

inline void check_row_grad(const at::Tensor& grad, const char* name, const at::Tensor& logits) {
  check_dim(grad, name, 1, "[B]");
  TORCH_CHECK(grad.size(0) == logits.size(0), name, " must have shape [", logits.size(0), "], got ", grad.sizes());
  check_device(grad, name, logits, "logits");
}

inline void check_langevin(const at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
                           const at::Tensor& lower, const at::Tensor& upper, const c10::optional<at::Tensor>& active) {
  TORCH_CHECK(x.dim() >= 2, "x must be [B, C, ...] (at least 2-D), got shape ", x.sizes());
  check_floating(x, "x", true);
  check_floating(grad, "grad", true);
  check_same_shape(grad, "grad", x, "x");
  check_device(grad, "grad", x, "x");
  TORCH_CHECK(step_size >= 0, "step_size must be >= 0, got ", step_size);
  TORCH_CHECK(noise_std >= 0, "noise_std must be >= 0, got ", noise_std);
  for (const auto* b : {&lower, &upper}) {
    const char* name = b == &lower ? "lower" : "upper";
    TORCH_CHECK(b->scalar_type() == at::kFloat || b->scalar_type() == at::kDouble, name,
                " must be a float32 or float64 tensor, got ", b->scalar_type());
    TORCH_CHECK(b->dim() == 1 && (b->size(0) == 1 || b->size(0) == x.size(1)), name,
                " must have shape [1] or [C] = [", x.size(1), "], got ", b->sizes());
    check_device(*b, name, x, "x");
  }
  TORCH_CHECK(lower.size(0) == upper.size(0), "lower and upper must have the same shape, got ", lower.sizes(),
              " and ", upper.sizes());
  if (active.has_value()) {
    TORCH_CHECK(active->scalar_type() == at::kBool, "active must be a bool tensor, got ", active->scalar_type());
    TORCH_CHECK(active->dim() == 1 && active->size(0) == x.size(0), "active must have shape [", x.size(0),
                "], got ", active->sizes());
    check_device(*active, "active", x, "x");
  }
}

inline void check_nullspace(const at::Tensor& jac, const at::Tensor& r, int64_t max_latent) {
  check_dim(jac, "jac", 3, "[B, D, d]");
  check_dim(r, "r", 2, "[B, D]");
  check_floating(jac, "jac", false);
  TORCH_CHECK(r.scalar_type() == jac.scalar_type(), "r must have the dtype of jac (", jac.scalar_type(), "), got ",
              r.scalar_type());
  check_device(r, "r", jac, "jac");
  TORCH_CHECK(r.size(0) == jac.size(0) && r.size(1) == jac.size(1), "r must have shape [B, D] = [", jac.size(0),
              ", ", jac.size(1), "], got ", r.sizes());
  TORCH_CHECK(jac.size(1) > jac.size(2), "jac must have D > d for a null space to exist, got D=", jac.size(1),
              ", d=", jac.size(2));
  TORCH_CHECK(jac.size(2) >= 1 && jac.size(2) <= max_latent, "jac's latent size d must be in [1, ", max_latent,
              "], got ", jac.size(2));
}

constexpr int64_t kMaxLatent = 64;

}  // namespace fastood
