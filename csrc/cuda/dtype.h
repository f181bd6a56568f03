// Maps an ATen dtype to the kernels' dtype tag.
#pragma once
#include <ATen/core/Tensor.h>

#include "cuda/dtype_tag.h"

namespace fastood {
namespace cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

}  // namespace cuda
}  // namespace fastood
