// Run-time choice of the CPU kernels' instruction set (capability): the best one that was compiled and that
// this CPU supports, or the one named by $FASTOOD_CPU_CAPABILITY (default | avx2 | avx512).
#pragma once
#include <string>
#include <vector>

#include "cpu/kernels/kernel_table.h"

namespace fastood {
namespace cpu {

// The kernels of the active capability (chosen on first use).
const KernelTable& kernels();

// Name of the active capability.
std::string cpu_capability();

// Capabilities compiled into this library, and those of them this CPU can run, best last.
std::vector<std::string> compiled_capabilities();
std::vector<std::string> supported_capabilities();

// Make `name` the active capability; throws (naming the choices) when it was not compiled or the CPU lacks it.
void set_cpu_capability(const std::string& name);

}  // namespace cpu
}  // namespace fastood
