// The dtype tag passed from the tensor-handling .cpp side to the light .cu launchers (declared in
// <op>_kernel.h). Plain types only: keeping ATen out of the .cu files keeps the CUDA build short.
#pragma once

namespace fastood {
namespace cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

}  // namespace cuda
}  // namespace fastood
