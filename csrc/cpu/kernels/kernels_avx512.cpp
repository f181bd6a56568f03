// The CPU kernels for capability "avx512" (see cpu/kernels/kernel_table.h). Build systems compile this file with
// the capability's flags (setup.py: CPU_CAPABILITY_FLAGS; CMakeLists.txt: FASTOOD_CPU_CAPABILITY_FLAGS).
#define CPU_CAPABILITY cap_avx512
#define FASTOOD_CAP_AVX512 1
#include "cpu/kernels/kernels_impl.h"
