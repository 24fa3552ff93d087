// CUDA execution emulator, part 1: the scheduler. Every CUDA thread of a block runs as a fiber (ucontext) on ONE
// OS thread, so a run is deterministic; blocks run one after another, so `__shared__` variables (static locals,
// see cuda_emu.h) are one copy per block as on the GPU (and keep the previous block's values, never zeros).
//
// Within a block, fibers run in the chosen ORDER (see `Order`): each ready fiber runs until it reaches a barrier
// or returns. Shared memory is filled with NaN bytes before each block (see __shared__ in cuda_emu.h). Barriers:
//   - block scope: __syncthreads (every thread of the block, all at the same call site);
//   - warp scope: __syncwarp, shuffles, WMMA ops (every lane of the warp, same call site and same kind).
// The last arrival may run a "collective" callback over all participants (shuffle exchange, WMMA loads) before
// the barrier releases. Aborted with a message (exit code 2): deadlock (no fiber can run), threads of one barrier
// at different call sites, a thread exiting while others of its block/warp wait at a barrier, partial warps or
// masks other than 0xffffffff in warp ops.
//
// NOT emulated: the memory model beyond barriers (no caches, no reordering: a missing __syncwarp right before a
// warp-collective op is not caught, the op itself is an execution barrier here), bank conflicts, timing, dynamic
// shared memory, atomics, cooperative groups, more than one block resident at a time.
#pragma once
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Per-thread built-ins: plain globals that the scheduler sets before it switches to a fiber (the switch is an
// opaque call, so the compiler reloads them after every barrier).
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

// Forward / Reverse / Shuffle: round-robin passes (warps advance about in lockstep). Greedy / GreedyReverse: always
// resume the lowest (highest) numbered ready thread, so one warp runs as far ahead of the others as barriers allow.
enum class Order { Forward, Reverse, Shuffle, Greedy, GreedyReverse };
enum class Scope { Block, Warp };

[[noreturn]] inline void fail(const char* fmt, ...) {
  std::fprintf(stderr, "cuda-emu: block (%u,%u,%u) thread (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::_Exit(2);
}

struct Fiber;
using Collective = void (*)(Fiber* const* lanes, int n);

struct Fiber {
  ucontext_t ctx;
  uint3 idx;
  int tid = 0;  // linear thread index in the block
  enum State { Ready, Waiting, Done } state = Ready;
  const char* kind = nullptr;  // what the fiber waits at, and where
  std::source_location site;
  void* arg = nullptr;   // per-lane operand of a collective
  uint32_t value = 0;    // per-lane input/output word of a shuffle
};

struct Barrier {
  int arrived = 0;
  const char* kind = nullptr;
  std::source_location site;
};

struct Runtime {
  static constexpr size_t kStack = 128 * 1024;
  Order order = Order::Forward;
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  std::vector<Fiber> fibers;
  std::vector<Barrier> warp_bars;
  Barrier block_bar;
  char* stacks = nullptr;
  size_t stack_slots = 0;
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
};
inline Runtime rt;

// Ranges filled with 0xff before each block (the __shared__ variables; see emu_shared.h).
struct Range {
  char* p;
  size_t n;
};
inline std::vector<Range> shared_ranges;

inline void poison_shared() {
  for (const Range& r : shared_ranges) std::memset(r.p, 0xff, r.n);
}

inline uint64_t next_rand() {
  rt.rng ^= rt.rng << 13;
  rt.rng ^= rt.rng >> 7;
  rt.rng ^= rt.rng << 17;
  return rt.rng;
}

inline void set_order(Order o, uint64_t seed) {
  rt.order = o;
  rt.rng = seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull;
  if (rt.rng == 0) rt.rng = 1;
}

inline std::string where(const char* kind, const std::source_location& s) {
  return std::string(kind) + " at " + s.file_name() + ":" + std::to_string(s.line());
}

// The fibers a barrier of `scope` waits for, for the fiber `f`.
inline void participants(const Fiber* f, Scope scope, int& first, int& n) {
  const int total = (int)rt.fibers.size();
  if (scope == Scope::Block) {
    first = 0;
    n = total;
  } else {
    first = f->tid / 32 * 32;
    n = total - first < 32 ? total - first : 32;
  }
}

inline void yield_to_scheduler() { swapcontext(&rt.cur->ctx, &rt.sched); }

// Arrives at a barrier; returns once every participant arrived (after `op`, run by the last arrival).
inline void arrive(Scope scope, const char* kind, const std::source_location& site, Collective op = nullptr,
                   void* arg = nullptr) {
  Fiber* f = rt.cur;
  int first = 0, n = 0;
  participants(f, scope, first, n);
  if (scope == Scope::Warp && n != 32) fail("%s: partial warp of %d lanes", where(kind, site).c_str(), n);
  Barrier& b = scope == Scope::Block ? rt.block_bar : rt.warp_bars[f->tid / 32];
  for (int i = first; i < first + n; ++i) {
    if (rt.fibers[i].state == Fiber::Done)
      fail("%s: thread %d of the same %s has already exited", where(kind, site).c_str(), i,
           scope == Scope::Block ? "block" : "warp");
  }
  if (b.arrived == 0) {
    b.kind = kind;
    b.site = site;
  } else if (b.kind != kind || b.site.line() != site.line() ||
             std::string(b.site.file_name()) != site.file_name()) {
    fail("divergent barrier: this thread reached %s while others wait at %s", where(kind, site).c_str(),
         where(b.kind, b.site).c_str());
  }
  f->state = Fiber::Waiting;
  f->kind = kind;
  f->site = site;
  f->arg = arg;
  if (++b.arrived == n) {
    std::vector<Fiber*> lanes;
    for (int i = first; i < first + n; ++i) lanes.push_back(&rt.fibers[i]);
    if (op) op(lanes.data(), n);
    for (Fiber* p : lanes) p->state = Fiber::Ready;
    b.arrived = 0;
  }
  yield_to_scheduler();
}

inline void fiber_main() {
  (*rt.body)();
  Fiber* f = rt.cur;
  f->state = Fiber::Done;
  if (rt.block_bar.arrived > 0)
    fail("exited while other threads of the block wait at %s", where(rt.block_bar.kind, rt.block_bar.site).c_str());
  const Barrier& w = rt.warp_bars[f->tid / 32];
  if (w.arrived > 0) fail("exited while other lanes of its warp wait at %s", where(w.kind, w.site).c_str());
  swapcontext(&f->ctx, &rt.sched);
}

inline void ensure_stacks(size_t n) {
  if (n <= rt.stack_slots) return;
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  const size_t slot = Runtime::kStack + page;  // a guard page below each stack catches overflows
  void* mem = mmap(nullptr, slot * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) fail("cannot map %zu fiber stacks", n);
  for (size_t i = 0; i < n; ++i) mprotect((char*)mem + i * slot, page, PROT_NONE);
  rt.stacks = (char*)mem;
  rt.stack_slots = n;
}

inline void report_deadlock() {
  std::string msg = "deadlock: no thread can run;";
  for (const Fiber& f : rt.fibers) {
    if (f.state == Fiber::Waiting)
      msg += " [thread " + std::to_string(f.tid) + ": " + where(f.kind, f.site) + "]";
  }
  fail("%s", msg.c_str());
}

inline void resume(Fiber& f) {
  rt.cur = &f;
  threadIdx = f.idx;
  swapcontext(&rt.sched, &f.ctx);
}

inline void run_greedy(size_t n) {
  const bool up = rt.order == Order::Greedy;
  for (;;) {
    Fiber* next = nullptr;
    bool live = false;
    for (size_t k = 0; k < n && next == nullptr; ++k) {
      Fiber& f = rt.fibers[up ? k : n - 1 - k];
      if (f.state == Fiber::Ready) next = &f;
    }
    if (next != nullptr) {
      resume(*next);
      continue;
    }
    for (const Fiber& f : rt.fibers) live = live || f.state != Fiber::Done;
    if (!live) return;
    report_deadlock();
  }
}

// Runs one block to completion.
inline void run_block(size_t n) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  rt.fibers.assign(n, Fiber{});
  rt.warp_bars.assign((n + 31) / 32, Barrier{});
  rt.block_bar = Barrier{};
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = rt.fibers[i];
    f.tid = (int)i;
    f.idx = uint3{(unsigned)(i % blockDim.x), (unsigned)(i / blockDim.x % blockDim.y),
                  (unsigned)(i / (blockDim.x * blockDim.y))};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = rt.stacks + i * (Runtime::kStack + page) + page;
    f.ctx.uc_stack.ss_size = Runtime::kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  poison_shared();
  if (rt.order == Order::Greedy || rt.order == Order::GreedyReverse) return run_greedy(n);
  std::vector<size_t> perm(n);
  for (;;) {
    for (size_t i = 0; i < n; ++i) perm[i] = rt.order == Order::Reverse ? n - 1 - i : i;
    if (rt.order == Order::Shuffle) {
      for (size_t i = n; i > 1; --i) std::swap(perm[i - 1], perm[next_rand() % i]);
    }
    bool ran = false, live = false;
    for (size_t i : perm) {
      Fiber& f = rt.fibers[i];
      if (f.state != Fiber::Ready) continue;
      ran = true;
      resume(f);
    }
    for (const Fiber& f : rt.fibers) live = live || f.state != Fiber::Done;
    if (!live) return;
    if (!ran) report_deadlock();
  }
}

// Launches `body` (which calls the kernel) over `grid` x `block`, blocks in order x, then y, then z.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const size_t n = (size_t)block.x * block.y * block.z;
  if (n == 0 || n > 1024) fail("launch: block of %zu threads (1..1024)", n);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("launch: grid (%u,%u,%u) outside the CUDA limits", grid.x, grid.y, grid.z);
  ensure_stacks(n);
  rt.body = &body;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(n);
      }
  rt.cur = nullptr;
}

}  // namespace emu
