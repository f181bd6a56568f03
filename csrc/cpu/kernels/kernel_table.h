// The CPU kernels compiled once per instruction set ("capability"), as a table of function pointers.
//
// Each capability's table is built from the same source (cpu/kernels/kernels_impl.h) by its own translation
// unit (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp), compiled with that instruction set's flags
// by setup.py and CMakeLists.txt; cpu/dispatch.cpp picks one table at run time from the CPU's features (or
// $FASTOOD_CPU_CAPABILITY). This header is shared by both sides, so it includes nothing but <cstdint>: the
// capability units must not instantiate inline functions that other units also use (the linker would keep one
// copy, possibly the AVX-512 one, for every caller).
#pragma once
#include <cstdint>

namespace fastood {
namespace cpu {

// Storage type of the rows a row kernel reads and writes (the arithmetic is float for all three).
enum class RowDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

struct PhiloxKey {
  uint32_t k0, k1;  // Philox key
  uint32_t s0, s1;  // upper half of the 128-bit counter (a per-call stream id)
};

constexpr int64_t kPhiloxBlocksPerChunk = 64;               // Philox blocks per chunk of normals
constexpr int64_t kNormalsPerChunk = 4 * kPhiloxBlocksPerChunk;  // four normals per block

// Scratch floats the softmax-entropy row kernels need per call: two rows, each rounded up to 16 floats.
constexpr int64_t kRowWork(int64_t cols) { return 2 * ((cols + 15) / 16 * 16); }

struct KernelTable {
  const char* name;  // "default", "avx2" or "avx512"
  // FIG modified energy of rows [begin, end) of logits [rows, cols] (s = f * inv_c): energy[b] = sum_y s_y
  // (1 - exp s_y) when energy != nullptr; grad[b, :] = g_b (1 - (1 + s) exp s) when grad != nullptr, with
  // g_b = inv_c * grad_scale[b] (or inv_c when grad_scale == nullptr). energy/grad have logits' dtype.
  void (*modified_energy_rows)(RowDtype dtype, const void* logits, int64_t begin, int64_t end, int64_t cols,
                               float inv_c, void* energy, void* grad, const float* grad_scale);
  // Entropy of softmax of rows [begin, end) into entropy[b] (logits' dtype). work: kRowWork(cols) floats.
  void (*softmax_entropy_forward_rows)(RowDtype dtype, const void* logits, int64_t begin, int64_t end,
                                       int64_t cols, void* entropy, float* work);
  // grad[b, :] = grad_entropy[b] * dH/df for rows [begin, end); work: kRowWork(cols) floats of scratch.
  void (*softmax_entropy_backward_rows)(RowDtype dtype, const void* logits, const float* grad_entropy,
                                        int64_t begin, int64_t end, int64_t cols, void* grad, float* work);
  // One run of n elements of a Langevin step (cpu/langevin_step.cpp), x in place (x and grad of `dtype`):
  // x = clamp(x - half_step * sign(grad) + sigma * z, lo, hi), the noise term only when z != nullptr. As torch:
  // sign(NaN) = 0, and a NaN in x (or z) stays NaN through the clamp.
  void (*langevin_run)(RowDtype dtype, void* x, const void* grad, const float* z, int64_t n, float half_step,
                       float sigma, float lo, float hi);
  // Entropy and its gradient dH/df (float [rows, cols]) of rows [begin, end): one call of the forward when a
  // backward will follow, so the backward is a row scaling (scale_rows) instead of a second exp pass.
  void (*softmax_entropy_forward_grad_rows)(RowDtype dtype, const void* logits, int64_t begin, int64_t end,
                                            int64_t cols, void* entropy, float* dentropy, float* work);
  // out[b, k] = scale[b] * d[b, k] rounded to `dtype` (out), rows [begin, end) of d (float [rows, cols]).
  void (*scale_rows)(RowDtype dtype, const float* d, const float* scale, int64_t begin, int64_t end, int64_t cols,
                     void* out);
  // Peak probe: `iterations` rounds of 12 independent FMA chains on the capability's vectors, register-resident
  // (what a core's FMA pipes sustain); returns the float32 FLOPs done (an FMA counts 2). `sink` keeps the result.
  double (*fma_probe)(int64_t iterations, float* sink);
  // The kNormalsPerChunk standard normals of chunk `chunk` (Philox4x32-10 + Box-Muller, cpu/langevin_step.cpp).
  void (*philox_normals)(int64_t chunk, PhiloxKey key, float* z);
  // Null-space projection (cpu/nullspace_project.cpp) of samples [begin, end) of jac [B, dim, d], r [B, dim]
  // (float64 when is_double, else float32) into out [B, dim]; work: nullspace_workspace_doubles(d, dim) zeroed
  // doubles per call.
  int64_t (*nullspace_workspace_doubles)(int64_t d, int64_t dim);
  void (*nullspace_project_samples)(bool is_double, const void* jac, const void* r, void* out, int64_t begin,
                                    int64_t end, int64_t dim, int64_t d, double* work);
};

namespace cap_default { extern const KernelTable kTable; }
namespace cap_avx2 { extern const KernelTable kTable; }
namespace cap_avx512 { extern const KernelTable kTable; }

}  // namespace cpu
}  // namespace fastood
