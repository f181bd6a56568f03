// SIMT emulation of the CUDA execution model on the host, so that g++ compiles the project's unchanged
// csrc/cuda/*_kernel.cu and runs them on the CPU (tests/test_cuda_emu.py). Force-included (-include) before
// every kernel translation unit, with tests/cuda_emu/include (stand-ins for cuda_runtime_api.h, cuda_fp16.h,
// cuda_bf16.h, curand_kernel.h) first on the include path.
//
// Model: one block at a time; each CUDA thread is a fiber (own stack, cooperative switching on one OS thread),
// run until its next synchronization point. __shared__ variables are function-local statics (one block runs
// at a time, so "static" is block-local). __syncthreads, __syncwarp and the warp shuffles / votes are
// rendezvous points resolved by the scheduler once every participating thread has arrived. Misuse is an
// error, reported with the source line, and the process exits with status 2:
//   - a shuffle / vote / __syncwarp whose mask names an exited lane, or lanes that are at different call sites
//     or give different masks or widths, or a calling lane outside its own mask;
//   - a block whose threads pass different numbers of __syncthreads (one exits or is at another call site while
//     others wait) -- a divergent barrier;
//   - a deadlock (no thread can proceed); and a watchdog (fastood_emu::set_watchdog) ends endless loops.
// Out-of-bounds shared (static) and global (heap) accesses are caught by building with -fsanitize=address.
// Not modelled: the memory model (races between threads between two barriers run in a fixed or permuted but
// serial order), independent thread scheduling within a warp, timing and performance.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"  // the stand-in: dim3, uint3, float4, cudaStream_t

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static
#define __managed__

namespace fastood_emu {

// ----------------------------------------------------------------------------------------------- the scheduler

// A rendezvous a thread waits at: a block barrier or a warp-level collective.
enum class SyncKind { kNone, kBarrier, kSyncwarp, kShuffle, kBallot };

struct SyncSite {
  SyncKind kind = SyncKind::kNone;
  const char* file = nullptr;
  int line = 0;
  unsigned mask = 0;  // warp collectives
  int width = 32;     // shuffles
  int mode = 0;       // shuffle: 0 idx, 1 up, 2 down, 3 xor; barrier: 0 plain, 1 and, 2 or, 3 count
};

struct ThreadState {
  uint3 idx;
  int linear = 0;
  bool started = false, exited = false, waiting = false;
  long barriers = 0;  // __syncthreads passed
  SyncSite site;
  uint64_t value = 0;   // the value given to a shuffle / the predicate of a vote or barrier
  int operand = 0;      // shuffle lane argument
  uint64_t result = 0;  // what the collective returns to this thread
  void* sp = nullptr;   // saved stack pointer while switched out
  void* fake_stack = nullptr;
};

// The calling (emulated) thread; the kernel's threadIdx refers to it.
ThreadState* current();
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Suspends the calling thread at `site` until the scheduler resolves the collective; returns its result.
uint64_t wait_at(const SyncSite& site, uint64_t value, int operand);

// Runs body() as every thread of every block of the grid. `name` is shown in error messages.
void run_grid(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* ctx);

// Fails the run: message to stderr, exit status 2.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// SIGALRM after `seconds` of one launch (0: off): a kernel that never finishes fails instead of hanging.
void set_watchdog(unsigned seconds);

// ------------------------------------------------------------------------------------------------ the launch

template <typename... P>
struct Launch {
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;
  const char* name;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "FASTOOD_LAUNCH: wrong number of kernel arguments");
    // Kernel arguments are copied by value into the launch, as the CUDA runtime does.
    struct Ctx {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    if (smem != 0) fail("%s: dynamic shared memory (%zu bytes) is not emulated", name, smem);
    run_grid(name, grid, block, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->fn, x->args);  // each thread gets its own view of the same argument values
    }, &ctx);
  }
};

template <typename... P>
Launch<P...> make_launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, const char* name) {
  return Launch<P...>{fn, grid, block, smem, name};
}

}  // namespace fastood_emu

// kernel<<<grid, block, smem, stream>>>(args) in the host code of csrc/cuda is written
// FASTOOD_LAUNCH(kernel, grid, block, smem, stream)(args); csrc/cuda/launch.cuh maps it to <<<>>> under nvcc.
#define FASTOOD_EMU_STR2(x) #x
#define FASTOOD_EMU_STR(x) FASTOOD_EMU_STR2(x)
#define FASTOOD_LAUNCH(kernel, grid, block, smem, stream)                                        \
  ::fastood_emu::make_launch(kernel, dim3(grid), dim3(block), smem, stream,                      \
                             "kernel launched at " __FILE__ ":" FASTOOD_EMU_STR(__LINE__))

#define threadIdx (::fastood_emu::current()->idx)
#define blockIdx (::fastood_emu::g_block_idx)
#define blockDim (::fastood_emu::g_block_dim)
#define gridDim (::fastood_emu::g_grid_dim)
#define warpSize 32

// --------------------------------------------------------------------------------------- intrinsics: barriers

namespace fastood_emu {

inline int barrier(const char* file, int line, int mode, int predicate) {
  SyncSite s;
  s.kind = SyncKind::kBarrier;
  s.file = file;
  s.line = line;
  s.mode = mode;
  return static_cast<int>(wait_at(s, predicate != 0, 0));
}

// __syncwarp(mask = all lanes), called as SyncwarpAt{file, line}(mask) so that the call site is recorded.
struct SyncwarpAt {
  const char* file;
  int line;
  void operator()(unsigned mask = 0xffffffffu) const {
    SyncSite s;
    s.kind = SyncKind::kSyncwarp;
    s.file = file;
    s.line = line;
    s.mask = mask;
    wait_at(s, 0, 0);
  }
};

template <typename T>
inline T shuffle(const char* file, int line, int mode, unsigned mask, T v, int operand, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("%s:%d: shuffle width %d is not a power of two in [1, 32]", file, line, width);
  SyncSite s;
  s.kind = SyncKind::kShuffle;
  s.file = file;
  s.line = line;
  s.mask = mask;
  s.width = width;
  s.mode = mode;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = wait_at(s, bits, operand);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned ballot(const char* file, int line, unsigned mask, int predicate) {
  SyncSite s;
  s.kind = SyncKind::kBallot;
  s.file = file;
  s.line = line;
  s.mask = mask;
  return static_cast<unsigned>(wait_at(s, predicate != 0, 0));
}

}  // namespace fastood_emu

#define __syncthreads() ::fastood_emu::barrier(__FILE__, __LINE__, 0, 0)
#define __syncthreads_and(p) ::fastood_emu::barrier(__FILE__, __LINE__, 1, (p))
#define __syncthreads_or(p) ::fastood_emu::barrier(__FILE__, __LINE__, 2, (p))
#define __syncthreads_count(p) ::fastood_emu::barrier(__FILE__, __LINE__, 3, (p))
#define __syncwarp(...) ::fastood_emu::SyncwarpAt{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_sync(...) ::fastood_emu::shuffle(__FILE__, __LINE__, 0, __VA_ARGS__)
#define __shfl_up_sync(...) ::fastood_emu::shuffle(__FILE__, __LINE__, 1, __VA_ARGS__)
#define __shfl_down_sync(...) ::fastood_emu::shuffle(__FILE__, __LINE__, 2, __VA_ARGS__)
#define __shfl_xor_sync(...) ::fastood_emu::shuffle(__FILE__, __LINE__, 3, __VA_ARGS__)
#define __ballot_sync(mask, p) ::fastood_emu::ballot(__FILE__, __LINE__, mask, (p))
#define __any_sync(mask, p) (::fastood_emu::ballot(__FILE__, __LINE__, mask, (p)) != 0u)
#define __all_sync(mask, p) (::fastood_emu::ballot(__FILE__, __LINE__, mask, (p)) == (mask))
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)

// ------------------------------------------------------------------------------------ intrinsics: bits, math

inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; memcpy(&i, &v, 4); return i; }
inline unsigned __float_as_uint(float v) { unsigned i; memcpy(&i, &v, 4); return i; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline double __longlong_as_double(long long v) { double d; memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double v) { long long i; memcpy(&i, &v, 8); return i; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }
inline void __sincosf(float v, float* s, float* c) { *s = sinf(v); *c = cosf(v); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// Atomics: threads of the emulation never run concurrently, so a plain read-modify-write is atomic.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
template <typename T> inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
template <typename T> inline T atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }
