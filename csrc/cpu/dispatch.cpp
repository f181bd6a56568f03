// Run-time choice of the CPU kernels' capability (cpu/dispatch.h) and the ops that report and switch it:
//   fastood::cpu_capability() -> str              the active one
//   fastood::cpu_capabilities() -> str[]          compiled into this library
//   fastood::cpu_capabilities_supported() -> str[] compiled and runnable on this CPU
//   fastood::set_cpu_capability(str name) -> ()   switch (tests compare every capability in one process)
//   fastood::cpu_fma_peak_flops(int iterations) -> float   measured FMA throughput of the active capability on
//                                                  torch's threads (bench/: the "% peak" of the CPU figures)
// The build defines FASTOOD_CPU_HAVE_AVX2 / FASTOOD_CPU_HAVE_AVX512 when it compiled those kernels.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fastood {
namespace cpu {
namespace {

struct Capability {
  const char* name;
  const KernelTable* table;
  bool (*cpu_has)();
};

bool always() { return true; }

#if defined(__x86_64__) || defined(__i386__)
bool has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers (XCR0).
[[maybe_unused]] bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
}
[[maybe_unused]] bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Compiled capabilities, best last.
const std::vector<Capability>& capabilities() {
  static const std::vector<Capability> list = {
      {"default", &cap_default::kTable, &always},
#if defined(FASTOOD_CPU_HAVE_AVX2)
      {"avx2", &cap_avx2::kTable, &has_avx2},
#endif
#if defined(FASTOOD_CPU_HAVE_AVX512)
      {"avx512", &cap_avx512::kTable, &has_avx512},
#endif
  };
  return list;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

const KernelTable* find_runnable(const std::string& name, const char* source) {
  for (const auto& cap : capabilities()) {
    if (name != cap.name) continue;
    TORCH_CHECK(cap.cpu_has(), source, ": CPU capability '", name, "' was compiled but this CPU lacks its "
                "instructions; this CPU supports: ", join(supported_capabilities()));
    return cap.table;
  }
  TORCH_CHECK(false, source, ": expected one of the compiled CPU capabilities (", join(compiled_capabilities()),
              "), got '", name, "'");
  return nullptr;
}

const KernelTable* choose() {
  const char* env = std::getenv("FASTOOD_CPU_CAPABILITY");
  if (env != nullptr && env[0] != '\0') return find_runnable(env, "FASTOOD_CPU_CAPABILITY");
  const KernelTable* best = &cap_default::kTable;
  for (const auto& cap : capabilities())
    if (cap.cpu_has()) best = cap.table;
  return best;
}

std::atomic<const KernelTable*> active{nullptr};
std::mutex choose_mutex;

}  // namespace

const KernelTable& kernels() {
  const KernelTable* table = active.load(std::memory_order_acquire);
  if (table != nullptr) return *table;
  std::lock_guard<std::mutex> lock(choose_mutex);
  table = active.load(std::memory_order_relaxed);
  if (table == nullptr) {
    table = choose();  // throws on a bad $FASTOOD_CPU_CAPABILITY, and then again on the next call
    active.store(table, std::memory_order_release);
  }
  return *table;
}

std::string cpu_capability() { return kernels().name; }

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> out;
  for (const auto& cap : capabilities()) out.emplace_back(cap.name);
  return out;
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (const auto& cap : capabilities())
    if (cap.cpu_has()) out.emplace_back(cap.name);
  return out;
}

void set_cpu_capability(const std::string& name) {
  const KernelTable* table = find_runnable(name, "set_cpu_capability");
  std::lock_guard<std::mutex> lock(choose_mutex);
  active.store(table, std::memory_order_release);
}

// FLOP/s of the active capability's fma_probe run on every torch thread at once (the best of three runs, so a
// descheduled thread does not drag the figure down).
double cpu_fma_peak_flops(int64_t iterations) {
  TORCH_CHECK(iterations > 0, "cpu_fma_peak_flops: iterations must be > 0, got ", iterations);
  const KernelTable& table = kernels();
  const int threads = at::get_num_threads();
  double best = 0;
  for (int run = 0; run < 3; ++run) {
    std::vector<double> flops(threads, 0.0);
    std::vector<float> sinks(threads, 0.0f);
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) flops[t] = table.fma_probe(iterations, &sinks[t]);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double total = 0;
    for (double f : flops) total += f;
    best = std::max(best, total / seconds);
  }
  return best;
}

TORCH_LIBRARY_FRAGMENT(fastood, m) {
  m.def("cpu_capability() -> str", &cpu_capability);
  m.def("cpu_capabilities() -> str[]", &compiled_capabilities);
  m.def("cpu_capabilities_supported() -> str[]", &supported_capabilities);
  m.def("set_cpu_capability(str name) -> ()", &set_cpu_capability);
  m.def("cpu_fma_peak_flops(int iterations) -> float", &cpu_fma_peak_flops);
}

}  // namespace cpu
}  // namespace fastood
