// FASTOOD_LAUNCH(kernel, grid, block, smem, stream)(args...): a kernel launch, written so that the SIMT emulation
// of the tests (tests/cuda_emu/emu.h, which defines its own FASTOOD_LAUNCH) compiles the same source with g++.
// `kernel` is one name (take a template instance's address into a local first: macro arguments cannot hold
// the commas of a template argument list).
#pragma once

#ifndef FASTOOD_LAUNCH
#define FASTOOD_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
