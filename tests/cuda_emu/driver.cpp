// Driver of the SIMT emulation: runs the launchers of csrc/cuda/*_kernel.cu (compiled for the host with emu.h)
// on buffers read from files, as told by a script (one command per line), and writes the outputs back.
// tests/test_cuda_emu.py writes the scripts and compares the outputs with fastood.ops.reference.
//
//   buf NAME BYTES SHIFT FILE|-   heap buffer of exactly BYTES bytes starting SHIFT bytes past a 16-byte-aligned
//                                 malloc (SHIFT > 0: the misaligned paths); contents from FILE, or 0xff bytes
//                                 (NaN in every float type, so an element the kernel fails to write shows up)
//   softmax_entropy DTYPE ROWS COLS LOGITS ENTROPY GRAD GRAD_ENTROPY
//   softmax_entropy_with_grad DTYPE ROWS COLS LOGITS ENTROPY DENTROPY        (DENTROPY: float32)
//   softmax_entropy_scale_rows DTYPE ROWS COLS DENTROPY GRAD_ENTROPY GRAD    (DTYPE: GRAD's; the others float32)
//   modified_energy DTYPE ROWS COLS C LOGITS ENERGY GRAD GRAD_SCALE
//   langevin DTYPE X GRAD NUMEL PER_ROW INNER CHANNELS CHANNELS_LAST HALF_STEP NOISE_STD LOWER UPPER NBOUNDS
//            ACTIVE SEED OFFSET
//   nullspace DTYPE JAC R OUT BATCH DIM LATENT
//   philox_increment NUMEL          prints the Philox offset increment of one Langevin launch
//   save NAME FILE
// Buffer operands are names or "-" (nullptr). DTYPE: f16 bf16 f32 f64. Exit status: 0 ok, 1 bad script,
// 2 an emulation error (emu.h), 3 the watchdog; sanitizer reports exit non-zero as well.
#include <ATen/cuda/PhiloxCudaState.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/langevin_step_kernel.h"
#include "cuda/modified_energy_kernel.h"
#include "cuda/nullspace_project_kernel.h"
#include "cuda/softmax_entropy_kernel.h"

namespace {

using fastood::cuda::DType;

struct Buffer {
  char* base = nullptr;
  char* data = nullptr;
  size_t bytes = 0;
};

std::map<std::string, Buffer> g_buffers;

[[noreturn]] void bad(const std::string& msg) {
  std::cerr << "cuda-emu driver: " << msg << std::endl;
  std::exit(1);
}

DType dtype(const std::string& s) {
  if (s == "f16") return DType::kHalf;
  if (s == "bf16") return DType::kBFloat16;
  if (s == "f32") return DType::kFloat;
  if (s == "f64") return DType::kDouble;
  bad("unknown dtype " + s);
}

void* ptr(const std::string& name) {
  if (name == "-") return nullptr;
  auto it = g_buffers.find(name);
  if (it == g_buffers.end()) bad("unknown buffer " + name);
  return it->second.data;
}

template <typename T>
T num(std::istringstream& in, const char* what) {
  T v;
  if (!(in >> v)) bad(std::string("expected ") + what);
  return v;
}

std::string word(std::istringstream& in, const char* what) { return num<std::string>(in, what); }

void make_buffer(std::istringstream& in) {
  const std::string name = word(in, "name");
  const auto bytes = num<size_t>(in, "bytes"), shift = num<size_t>(in, "shift");
  const std::string file = word(in, "file");
  Buffer b;
  // Exactly bytes + shift: ASan flags any access past the end (and before `data` only when shift == 0).
  b.base = static_cast<char*>(std::malloc(bytes + shift > 0 ? bytes + shift : 1));
  b.data = b.base + shift;
  b.bytes = bytes;
  if (file == "-") {
    std::memset(b.data, 0xff, bytes);
  } else {
    std::ifstream f(file, std::ios::binary);
    if (!f.read(b.data, static_cast<std::streamsize>(bytes))) bad("cannot read " + std::to_string(bytes) + " bytes of " + file);
  }
  if (g_buffers.count(name)) std::free(g_buffers[name].base);
  g_buffers[name] = b;
}

void save(std::istringstream& in) {
  const std::string name = word(in, "name"), file = word(in, "file");
  auto it = g_buffers.find(name);
  if (it == g_buffers.end()) bad("unknown buffer " + name);
  std::ofstream f(file, std::ios::binary);
  f.write(it->second.data, static_cast<std::streamsize>(it->second.bytes));
  if (!f) bad("cannot write " + file);
}

void run(const std::string& line) {
  std::istringstream in(line);
  std::string cmd;
  if (!(in >> cmd) || cmd[0] == '#') return;
  if (cmd == "buf") {
    make_buffer(in);
  } else if (cmd == "save") {
    save(in);
  } else if (cmd == "softmax_entropy") {
    const DType dt = dtype(word(in, "dtype"));
    const auto rows = num<int64_t>(in, "rows"), cols = num<int64_t>(in, "cols");
    void* logits = ptr(word(in, "logits"));
    void* entropy = ptr(word(in, "entropy"));
    void* grad = ptr(word(in, "grad"));
    void* grad_entropy = ptr(word(in, "grad_entropy"));
    fastood::cuda::launch_softmax_entropy_kernel(dt, logits, rows, cols, entropy, grad, grad_entropy, nullptr);
  } else if (cmd == "softmax_entropy_with_grad") {
    const DType dt = dtype(word(in, "dtype"));
    const auto rows = num<int64_t>(in, "rows"), cols = num<int64_t>(in, "cols");
    void* logits = ptr(word(in, "logits"));
    void* entropy = ptr(word(in, "entropy"));
    auto* dentropy = static_cast<float*>(ptr(word(in, "dentropy")));
    fastood::cuda::launch_softmax_entropy_with_grad_kernel(dt, logits, rows, cols, entropy, dentropy, nullptr);
  } else if (cmd == "softmax_entropy_scale_rows") {
    const DType dt = dtype(word(in, "dtype"));
    const auto rows = num<int64_t>(in, "rows"), cols = num<int64_t>(in, "cols");
    const auto* dentropy = static_cast<const float*>(ptr(word(in, "dentropy")));
    const auto* grad_entropy = static_cast<const float*>(ptr(word(in, "grad_entropy")));
    void* grad = ptr(word(in, "grad"));
    fastood::cuda::launch_softmax_entropy_scale_rows_kernel(dt, dentropy, grad_entropy, rows, cols, grad, nullptr);
  } else if (cmd == "modified_energy") {
    const DType dt = dtype(word(in, "dtype"));
    const auto rows = num<int64_t>(in, "rows"), cols = num<int64_t>(in, "cols");
    const auto c = num<double>(in, "c");
    void* logits = ptr(word(in, "logits"));
    void* energy = ptr(word(in, "energy"));
    void* grad = ptr(word(in, "grad"));
    void* scale = ptr(word(in, "grad_scale"));
    fastood::cuda::launch_modified_energy_kernel(dt, logits, rows, cols, c, energy, grad, scale, nullptr);
  } else if (cmd == "langevin") {
    const DType dt = dtype(word(in, "dtype"));
    fastood::cuda::LangevinStepParams p{};
    p.x = ptr(word(in, "x"));
    p.grad = ptr(word(in, "grad"));
    p.numel = num<int64_t>(in, "numel");
    p.per_row = num<int64_t>(in, "per_row");
    p.inner = num<int64_t>(in, "inner");
    p.channels = num<int64_t>(in, "channels");
    p.channels_last = num<int>(in, "channels_last") != 0;
    p.half_step = num<double>(in, "half_step");
    p.noise_std = num<double>(in, "noise_std");
    p.lower = static_cast<const double*>(ptr(word(in, "lower")));
    p.upper = static_cast<const double*>(ptr(word(in, "upper")));
    p.nbounds = num<int64_t>(in, "nbounds");
    p.active = static_cast<const bool*>(ptr(word(in, "active")));
    const auto seed = num<uint64_t>(in, "seed"), offset = num<uint64_t>(in, "offset");
    fastood::cuda::launch_langevin_step_kernel(dt, p, at::PhiloxCudaState(seed, offset), nullptr);
  } else if (cmd == "nullspace") {
    const DType dt = dtype(word(in, "dtype"));
    void* jac = ptr(word(in, "jac"));
    void* r = ptr(word(in, "r"));
    void* out = ptr(word(in, "out"));
    const auto batch = num<int64_t>(in, "batch"), dim = num<int64_t>(in, "dim"), latent = num<int64_t>(in, "latent");
    fastood::cuda::launch_nullspace_project_kernel(dt, jac, r, out, batch, dim, latent, nullptr);
  } else if (cmd == "philox_increment") {
    std::cout << fastood::cuda::langevin_step_philox_increment(num<int64_t>(in, "numel")) << std::endl;
  } else {
    bad("unknown command " + cmd);
  }
}

}  // namespace

namespace fastood_emu {
void set_watchdog(unsigned seconds);
}

int main(int argc, char** argv) {
  if (argc != 2) bad("usage: cuda_emu_driver SCRIPT");
  const char* wd = std::getenv("FASTOOD_EMU_WATCHDOG_S");
  fastood_emu::set_watchdog(wd ? static_cast<unsigned>(std::atoi(wd)) : 240u);  // per launch
  std::ifstream script(argv[1]);
  if (!script) bad(std::string("cannot open ") + argv[1]);
  std::string line;
  while (std::getline(script, line)) run(line);
  for (auto& kv : g_buffers) std::free(kv.second.base);
  return 0;
}
