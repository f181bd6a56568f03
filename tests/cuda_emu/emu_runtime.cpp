// The scheduler of the SIMT emulation (emu.h): fibers for the threads of one block, rendezvous resolution for
// barriers and warp collectives, misuse checks, deadlock detection and the watchdog.
//
// Schedule (FASTOOD_EMU_SCHEDULE): "forward" runs threads 0, 1, 2, ... up to their next sync point in every
// round, "reverse" the other way round, "random:SEED" in a fresh seeded permutation per round. Code that is
// correct under CUDA's rules gives the same result under all three; a missing barrier usually does not.
#include "emu.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FASTOOD_EMU_ASAN 1
#endif

extern "C" void fastood_emu_switch(void** save_sp, void* new_sp);

// Saves the callee-saved registers (and the SSE/x87 control words) on the current stack, stores the stack
// pointer in *save_sp, loads new_sp and restores the same frame from there: a cooperative context switch
// without the signal-mask system call of swapcontext.
#if defined(__x86_64__)
asm(R"(
.text
.globl fastood_emu_switch
.type fastood_emu_switch,@function
fastood_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fastood_emu_switch, .-fastood_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#elif defined(__aarch64__)
asm(R"(
.text
.globl fastood_emu_switch
.type fastood_emu_switch,%function
fastood_emu_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
.size fastood_emu_switch, .-fastood_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "the CUDA emulation's context switch is written for x86-64 and aarch64"
#endif

namespace fastood_emu {

uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

#if defined(FASTOOD_EMU_ASAN)
constexpr size_t kStackBytes = 512 * 1024;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

struct Fiber {
  ThreadState state;
  char* stack = nullptr;
};

std::vector<Fiber> g_fibers;
ThreadState* g_current = nullptr;
void* g_scheduler_sp = nullptr;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
const char* g_kernel = "";
unsigned g_watchdog_s = 0;
enum class Order { kForward, kReverse, kRandom } g_order = Order::kForward;
std::mt19937 g_rng(0);
bool g_configured = false;

#if defined(FASTOOD_EMU_ASAN)
const void* g_main_stack_bottom = nullptr;
size_t g_main_stack_size = 0;
#endif

const char* kind_name(SyncKind k) {
  switch (k) {
    case SyncKind::kBarrier: return "__syncthreads";
    case SyncKind::kSyncwarp: return "__syncwarp";
    case SyncKind::kShuffle: return "a warp shuffle";
    case SyncKind::kBallot: return "a warp vote";
    default: return "nothing";
  }
}

std::string where(const ThreadState& t) {
  char buf[512];
  if (t.exited) snprintf(buf, sizeof buf, "thread %d has exited after %ld barriers", t.linear, t.barriers);
  else if (!t.waiting) snprintf(buf, sizeof buf, "thread %d is running", t.linear);
  else
    snprintf(buf, sizeof buf, "thread %d waits at %s (%s:%d, mask 0x%08x) after %ld barriers", t.linear,
             kind_name(t.site.kind), t.site.file, t.site.line, t.site.mask, t.barriers);
  return buf;
}

void configure() {
  if (g_configured) return;
  g_configured = true;
  const char* s = getenv("FASTOOD_EMU_SCHEDULE");
  std::string v = s ? s : "forward";
  if (v == "forward") g_order = Order::kForward;
  else if (v == "reverse") g_order = Order::kReverse;
  else if (v.rfind("random:", 0) == 0) {
    g_order = Order::kRandom;
    g_rng.seed(static_cast<unsigned>(strtoul(v.c_str() + 7, nullptr, 10)));
  } else fail("FASTOOD_EMU_SCHEDULE must be forward, reverse or random:SEED, got %s", v.c_str());
}

[[noreturn]] void fiber_main();

void switch_to(ThreadState* t, Fiber& f) {
  g_current = t;
#if defined(FASTOOD_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  fastood_emu_switch(&g_scheduler_sp, t->sp);
#if defined(FASTOOD_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_current = nullptr;
}

// Back to the scheduler from the calling fiber.
void yield_to_scheduler(bool exiting) {
  ThreadState* t = g_current;
#if defined(FASTOOD_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t->fake_stack, g_main_stack_bottom, g_main_stack_size);
#endif
  fastood_emu_switch(&t->sp, g_scheduler_sp);
#if defined(FASTOOD_EMU_ASAN)
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
  (void)exiting;
}

void fiber_main() {
#if defined(FASTOOD_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
  g_body(g_body_ctx);
  g_current->exited = true;
  yield_to_scheduler(true);
  fail("internal error: an exited thread was resumed");
}

// A fresh stack whose first switch "returns" into fiber_main.
void* initial_sp(char* stack) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
#if defined(__x86_64__)
  slot[-1] = 0;                                            // fake return address of fiber_main (never used)
  slot[-2] = reinterpret_cast<uint64_t>(&fiber_main);      // popped by `ret`
  for (int i = 3; i <= 8; ++i) slot[-i] = 0;               // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  memcpy(&slot[-9], csr, 8);
  return &slot[-9];
#else
  uint64_t* frame = slot - 22;  // 176 bytes
  memset(frame, 0, 176);
  frame[11] = reinterpret_cast<uint64_t>(&fiber_main);  // x30 (lr)
  return frame;
#endif
}

// The lanes (0-31) of warp `w` among the block's threads.
inline ThreadState& lane_state(int warp, int lane) { return g_fibers[warp * 32 + lane].state; }

// Resolves what can be resolved among threads that all wait or have exited. Returns true if some thread was
// released.
bool resolve(int nthreads) {
  const int nwarps = (nthreads + 31) / 32;
  bool released = false;
  bool warp_pending = false;
  for (int w = 0; w < nwarps; ++w) {
    const int lanes = std::min(32, nthreads - w * 32);
    for (int l = 0; l < lanes; ++l) {
      ThreadState& t = lane_state(w, l);
      if (!t.waiting || t.site.kind == SyncKind::kBarrier) continue;
      const unsigned mask = t.site.mask;
      if (!(mask >> l & 1u))
        fail("%s: %s:%d: lane %d of warp %d calls %s with mask 0x%08x, which does not name the lane itself",
             g_kernel, t.site.file, t.site.line, l, w, kind_name(t.site.kind), mask);
      bool ready = true;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        if (m >= lanes)
          fail("%s: %s:%d: lane %d of warp %d calls %s with mask 0x%08x, naming lane %d which the block does not "
               "have (%d threads)", g_kernel, t.site.file, t.site.line, l, w, kind_name(t.site.kind), mask, m,
               nthreads);
        const ThreadState& o = lane_state(w, m);
        if (!o.exited && !o.waiting) {  // released a moment ago by another collective: decide in the next round
          ready = false;
          continue;
        }
        if (o.exited)
          fail("%s: %s:%d: lane %d of warp %d calls %s with mask 0x%08x, which names lane %d; but %s",
               g_kernel, t.site.file, t.site.line, l, w, kind_name(t.site.kind), mask, m, where(o).c_str());
        if (o.site.kind == SyncKind::kBarrier)
          fail("%s: warp divergence: lane %d of warp %d waits at %s (%s:%d, mask 0x%08x) while %s", g_kernel, l, w,
               kind_name(t.site.kind), t.site.file, t.site.line, mask, where(o).c_str());
        if (o.site.kind != t.site.kind || o.site.line != t.site.line || strcmp(o.site.file, t.site.file) != 0 ||
            o.site.mask != mask || o.site.width != t.site.width || o.site.mode != t.site.mode)
          fail("%s: lanes of warp %d disagree on a warp collective: %s, while %s", g_kernel, w, where(t).c_str(),
               where(o).c_str());
      }
      if (!ready) continue;
      // Every lane of the mask is here: compute all results, then release them.
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        ThreadState& o = lane_state(w, m);
        switch (t.site.kind) {
          case SyncKind::kShuffle: {
            const int width = t.site.width;
            const int seg = m & ~(width - 1);  // first lane of this lane's segment
            int src;
            switch (t.site.mode) {
              case 0: src = seg + (o.operand & (width - 1)); break;                       // idx
              case 1: src = (m - seg) >= o.operand ? m - o.operand : m; break;          // up
              case 2: src = (m - seg) + o.operand < width ? m + o.operand : m; break;    // down
              default: src = ((m ^ o.operand) & ~(width - 1)) == seg ? m ^ o.operand : m;  // xor
            }
            if (src < 0 || src >= 32 || !(mask >> src & 1u))
              fail("%s: %s:%d: lane %d of warp %d reads lane %d in a shuffle whose mask 0x%08x does not name it "
                   "(undefined on the GPU)", g_kernel, o.site.file, o.site.line, m, w, src, mask);
            o.result = lane_state(w, src).value;
            break;
          }
          case SyncKind::kBallot: {
            uint64_t bits = 0;
            for (int k = 0; k < 32; ++k)
              if ((mask >> k & 1u) && lane_state(w, k).value) bits |= 1ull << k;
            o.result = bits;
            break;
          }
          default: o.result = 0;
        }
      }
      for (int m = 0; m < 32; ++m)
        if (mask >> m & 1u) lane_state(w, m).waiting = false;
      released = true;
    }
    for (int l = 0; l < lanes; ++l) {
      const ThreadState& t = lane_state(w, l);
      if (t.waiting && t.site.kind != SyncKind::kBarrier) warp_pending = true;
    }
  }
  if (released || warp_pending) return released;
  // Only barriers (or exits) remain: all live threads must be at the same __syncthreads.
  const ThreadState* first = nullptr;
  bool any_exited = false;
  for (int i = 0; i < nthreads; ++i) {
    const ThreadState& t = g_fibers[i].state;
    if (t.exited) { any_exited = true; continue; }
    if (!first) first = &t;
    else if (t.site.line != first->site.line || strcmp(t.site.file, first->site.file) != 0 ||
             t.site.mode != first->site.mode || t.barriers != first->barriers)
      fail("%s: divergent __syncthreads in block (%u, %u, %u): %s, while %s", g_kernel, g_block_idx.x,
           g_block_idx.y, g_block_idx.z, where(*first).c_str(), where(t).c_str());
  }
  if (!first) return false;  // all exited
  if (any_exited)
    for (int i = 0; i < nthreads; ++i)
      if (g_fibers[i].state.exited)
        fail("%s: divergent __syncthreads in block (%u, %u, %u): %s, while %s", g_kernel, g_block_idx.x,
             g_block_idx.y, g_block_idx.z, where(*first).c_str(), where(g_fibers[i].state).c_str());
  uint64_t all = 1, any = 0, count = 0;
  for (int i = 0; i < nthreads; ++i) {
    const uint64_t p = g_fibers[i].state.value;
    all &= p;
    any |= p;
    count += p;
  }
  const int mode = first->site.mode;
  const uint64_t result = mode == 1 ? all : mode == 2 ? any : mode == 3 ? count : 0;
  for (int i = 0; i < nthreads; ++i) {
    ThreadState& t = g_fibers[i].state;
    t.result = result;
    t.waiting = false;
    ++t.barriers;
  }
  return true;
}

void run_block(int nthreads) {
  std::vector<int> order(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = g_fibers[i];
    f.state = ThreadState();
    f.state.linear = i;
    f.state.idx = uint3{static_cast<unsigned>(i % g_block_dim.x),
                        static_cast<unsigned>(i / g_block_dim.x % g_block_dim.y),
                        static_cast<unsigned>(i / (g_block_dim.x * g_block_dim.y))};
#if defined(FASTOOD_EMU_ASAN)
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    f.state.sp = initial_sp(f.stack);
    order[i] = g_order == Order::kReverse ? nthreads - 1 - i : i;
  }
  for (;;) {
    if (g_order == Order::kRandom) std::shuffle(order.begin(), order.end(), g_rng);
    for (int i : order) {
      Fiber& f = g_fibers[i];
      if (f.state.exited || f.state.waiting) continue;
      switch_to(&f.state, f);
    }
    bool all_exited = true;
    for (int i = 0; i < nthreads; ++i) all_exited &= g_fibers[i].state.exited;
    if (all_exited) return;
    if (!resolve(nthreads)) {
      std::string dump;
      for (int i = 0; i < nthreads && i < 64; ++i) dump += "\n  " + where(g_fibers[i].state);
      fail("%s: deadlock in block (%u, %u, %u): no thread can proceed%s", g_kernel, g_block_idx.x, g_block_idx.y,
           g_block_idx.z, dump.c_str());
    }
  }
}

void on_alarm(int) {
  static const char msg[] = "fastood-emu: ERROR: watchdog: a kernel launch did not finish in time "
                            "(endless loop or deadlock)\n";
  (void)!write(2, msg, sizeof msg - 1);
  _exit(3);
}

}  // namespace

ThreadState* current() {
  if (!g_current) fail("threadIdx or a device intrinsic used outside a kernel launch");
  return g_current;
}

void fail(const char* fmt, ...) {
  fflush(stdout);
  fprintf(stderr, "fastood-emu: ERROR: ");
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  fflush(stderr);
  _exit(2);
}

void set_watchdog(unsigned seconds) {
  g_watchdog_s = seconds;
  signal(SIGALRM, on_alarm);
}

uint64_t wait_at(const SyncSite& site, uint64_t value, int operand) {
  ThreadState* t = current();
  t->site = site;
  t->value = value;
  t->operand = operand;
  t->waiting = true;
  yield_to_scheduler(false);
  return t->result;
}

void run_grid(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  configure();
  if (g_current) fail("%s: kernel launched from inside a kernel", name);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    fail("%s: invalid block (%u, %u, %u): 1 to 1024 threads, z <= 64", name, block.x, block.y, block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    fail("%s: invalid grid (%u, %u, %u)", name, grid.x, grid.y, grid.z);
  if (g_fibers.size() < threads) {
    const size_t old = g_fibers.size();
    g_fibers.resize(threads);
    for (size_t i = old; i < threads; ++i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
      g_fibers[i].stack = static_cast<char*>(p);
    }
  }
  g_kernel = name;
  g_body = body;
  g_body_ctx = ctx;
  g_grid_dim = grid;
  g_block_dim = block;
  if (g_watchdog_s) alarm(g_watchdog_s);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        run_block(static_cast<int>(threads));
      }
  if (g_watchdog_s) alarm(0);
  g_kernel = "";
}

}  // namespace fastood_emu
