// The CPU kernels for capability "default" (see cpu/kernels/kernel_table.h). Build systems compile this file with
// the capability's flags (setup.py: CPU_CAPABILITY_FLAGS; CMakeLists.txt: FASTOOD_CPU_CAPABILITY_FLAGS).
#define CPU_CAPABILITY cap_default
#define FASTOOD_CAP_DEFAULT 1
#include "cpu/kernels/kernels_impl.h"
