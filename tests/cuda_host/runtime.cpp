// The host execution harness's runtime: runs a kernel of kernels/cuda on the
// CPU under CUDA's execution model and reports what GPU tools report.
//
// - Each thread of a block is a fiber (ucontext, 64 KiB of stack); a fiber
//   runs until it reaches __syncthreads, a warp collective, or its end.
//   Blocks run one after another on the launching OS thread.
// - __syncthreads releases the block once every thread waits there; if some
//   threads have exited (or wait at a warp collective) instead, that is
//   barrier divergence. A warp collective completes once every lane its mask
//   names has arrived with the same mask; a mask without the calling lane,
//   naming a lane that does not exist, has exited or waits elsewhere is an
//   error.
// - Every load and store of the kernel translation units (compiled with
//   -fsanitize=thread, whose callbacks are defined here: this is not TSan's
//   runtime) is checked while a kernel runs: the fiber's own stack, the
//   block's shared memory (static: this module's TLS block; dynamic: an arena
//   of exactly the launch's bytes), the launch's parameters (read only), or
//   inside a CPU allocation made while the harness is loaded (the tensors),
//   else it is an out-of-bounds access.
// - Shared memory race check (as compute-sanitizer's racecheck): per shared
//   byte, the last writer and the readers of the current barrier interval;
//   a write and another thread's read or write of the byte in one interval
//   is a race, unless both threads are lanes of one warp and a warp
//   collective of that warp completed in between (it synchronises them).
//   Two atomics do not race with each other; an atomic and a plain access
//   do.
//   A read of a shared byte that no thread of the block has written is an
//   error too (shared memory is undefined when a block starts).
// - Misaligned accesses (-fsanitize=alignment, handler defined here): a
//   vector type's alignment is its size, as on the GPU.
// Errors name the kernel, the block and the thread, and make the launch
// raise; the fibers of a failed launch are abandoned, never resumed.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <dlfcn.h>
#include <link.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_host.h"

namespace pmx_host {
namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // without the opt-in attribute
constexpr unsigned kWarp = 32;

// -- CPU allocations (the tensors a kernel may touch) ------------------------

// Live CPU allocations by start: their exact extent, and the base
// allocator's allocation that holds them.
struct Allocation {
  size_t bytes;
  c10::DataPtr inner;
};
std::mutex g_alloc_mutex;
std::map<uintptr_t, Allocation> g_allocs;

// Wraps the CPU allocator: records each allocation's exact extent, and keeps
// 64 bytes of slack after it that belong to no tensor, so that an access just
// past a tensor is never inside the next one. Its DataPtrs are "simple" (the
// context is the data), as raw_allocate's callers (oneDNN) require.
struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;

  static void deleter(void* p) {
    c10::DataPtr inner;
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      auto it = g_allocs.find(reinterpret_cast<uintptr_t>(p));
      if (it == g_allocs.end()) {
        return;
      }
      inner = std::move(it->second.inner);
      g_allocs.erase(it);
    }
  }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base->allocate(n + 64);
    void* data = inner.get();
    if (data == nullptr) {
      return inner;
    }
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      g_allocs[reinterpret_cast<uintptr_t>(data)] = Allocation{n, std::move(inner)};
    }
    return c10::DataPtr(data, data, &deleter, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

TrackingAllocator g_tracking;

// Tracking on: CPU allocations from now on are registered (the tests turn it
// on before they make the harness's inputs, and off after).
void track_allocations(bool on) {
  static c10::Allocator* original = c10::GetCPUAllocator();
  g_tracking.base = original;
  c10::SetCPUAllocator(on ? static_cast<c10::Allocator*>(&g_tracking) : original, /*priority=*/100);
}

// -- launches ----------------------------------------------------------------

enum class State { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  ucontext_t ctx;
  State state = State::kRunnable;
};

// A warp collective waiting for lanes.
struct WarpOp {
  bool pending = false;
  unsigned mask = 0, arrived = 0;
  uint64_t value[kWarp];
  unsigned result[kWarp];
};

// The shadow of a shared byte: its writer and readers in the current
// interval (keys: block serial and barrier epoch; stale keys mean none).
struct Shadow {
  uint64_t w_key = 0, r_key = 0;
  int32_t w_tid = 0, r_tid = 0;
  uint32_t w_sync = 0, r_sync = 0;
  bool w_atomic = false, r_multi = false;
};

struct Range {
  uintptr_t begin, end;
};

struct Launch {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  Entry entry = nullptr;
  void* params = nullptr;
  size_t params_bytes = 0;
  unsigned nthreads = 0;

  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  int current = -1;  // the running fiber, -1 in the scheduler
  ucontext_t sched;
  uint64_t serial = 0;
  uint64_t epoch = 0;
  std::vector<uint32_t> warp_sync;  // completed collectives per warp
  std::vector<WarpOp> warps;
  bool failed = false;
  std::string error;
  // Set while the runtime itself runs on a fiber: inline library code it
  // calls may be the kernel units' instrumented copy (one copy is linked),
  // whose accesses are not the kernel's.
  bool in_runtime = false;

  Range stacks{0, 0}, tls{0, 0}, dyn{0, 0}, param{0, 0};
  std::vector<Range> allocs;  // sorted
};

thread_local Launch* tl_launch = nullptr;
// Reused from launch to launch (grown as needed).
thread_local char* tl_stacks = nullptr;
thread_local size_t tl_stack_count = 0;
thread_local std::vector<unsigned char> tl_dyn;
thread_local std::vector<Shadow> tl_shadow_tls, tl_shadow_dyn;
thread_local uint64_t tl_serial = 0;

std::string dim_str(unsigned x, unsigned y, unsigned z) {
  std::ostringstream s;
  s << "(" << x << ", " << y << ", " << z << ")";
  return s.str();
}

std::string short_name(const char* pretty) {
  // "... [with auto Kernel = ns::{anonymous}::crop_kernel<float>; ...]"
  std::string s(pretty);
  const size_t k = s.find("Kernel = ");
  if (k == std::string::npos) {
    return s;
  }
  s = s.substr(k + 9);
  int depth = 0;
  size_t end = s.size(), last_colon = std::string::npos;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<' || c == '(') {
      ++depth;
    } else if (c == '>' || c == ')') {
      --depth;
    } else if (depth == 0 && (c == ';' || c == ']')) {
      end = i;
      break;
    } else if (depth == 0 && c == ':' && i + 1 < s.size() && s[i + 1] == ':') {
      last_colon = i + 1;
    }
  }
  s = s.substr(0, end);
  if (last_colon != std::string::npos && last_colon < end) {
    s = s.substr(last_colon + 1);
  }
  return s;
}

std::string where(const Launch& L, int tid) {
  std::ostringstream s;
  s << "in " << L.name << ", block " << dim_str(L.block_idx.x, L.block_idx.y, L.block_idx.z);
  if (tid >= 0) {
    const unsigned bx = L.block.x, by = L.block.y;
    s << ", thread " << dim_str(tid % bx, (tid / bx) % by, tid / (bx * by));
  }
  return s.str();
}

// Marks the runtime's own work on a fiber (see Launch::in_runtime).
struct RuntimeScope {
  Launch& L;
  bool saved;
  explicit RuntimeScope(Launch& l) : L(l), saved(l.in_runtime) { L.in_runtime = true; }
  ~RuntimeScope() { L.in_runtime = saved; }
};

[[noreturn]] void fail_in_fiber(Launch& L, const std::string& what) {
  L.in_runtime = true;
  L.failed = true;
  L.error = what + " (" + where(L, L.current) + ")";
  Fiber& f = L.fibers[L.current];
  swapcontext(&f.ctx, &L.sched);
  std::abort();  // a failed launch's fibers are never resumed
}

Launch& kernel_launch() {
  Launch* L = tl_launch;
  if (L == nullptr || L->current < 0) {
    TORCH_CHECK(false, "pymatting_ext CUDA host harness: a device function was called outside a kernel");
  }
  return *L;
}

// -- the shared-memory race check ---------------------------------------------

void race(Launch& L, const char* kind, int other, uintptr_t addr, const char* region, uintptr_t base) {
  std::ostringstream s;
  s << "shared memory race: " << kind << " of " << region << " shared byte " << (addr - base)
    << " by this thread and thread " << other << " (linear) in one barrier interval, with no __syncthreads between";
  fail_in_fiber(L, s.str());
}

bool warp_ordered(const Launch& L, int a, uint32_t sync_a, int b) {
  return unsigned(a) / kWarp == unsigned(b) / kWarp && L.warp_sync[unsigned(b) / kWarp] > sync_a;
}

void shadow_access(Launch& L, std::vector<Shadow>& shadow, uintptr_t base, const char* region,
                   uintptr_t addr, size_t n, bool write, bool atomic) {
  const int t = L.current;
  const uint64_t key = (L.serial << 24) | L.epoch;
  const uint32_t sync_now = L.warp_sync[unsigned(t) / kWarp];
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = shadow[addr - base + i];
    if (!write || atomic) {
      // Shared memory starts undefined in every block (here it holds the
      // previous block's values).
      if ((s.w_key >> 24) != L.serial) {
        std::ostringstream m;
        m << "read of uninitialized " << region << " shared byte " << (addr + i - base)
          << ": no thread of this block has written it";
        fail_in_fiber(L, m.str());
      }
    }
    if (s.w_key == key && s.w_tid != t && !(atomic && s.w_atomic) && !warp_ordered(L, s.w_tid, s.w_sync, t)) {
      race(L, write ? "a write after a write" : "a read after a write", s.w_tid, addr + i, region, base);
    }
    if (write && s.r_key == key && (s.r_multi || (s.r_tid != t && !warp_ordered(L, s.r_tid, s.r_sync, t)))) {
      race(L, "a write after a read", s.r_tid, addr + i, region, base);
    }
    if (write) {
      s.w_key = key;
      s.w_tid = t;
      s.w_sync = sync_now;
      s.w_atomic = atomic;
    } else if (s.r_key != key) {
      s.r_key = key;
      s.r_tid = t;
      s.r_sync = sync_now;
      s.r_multi = false;
    } else if (s.r_tid != t) {
      s.r_multi = true;
    }
  }
}

// Every access of a kernel: where it may go (see the header comment).
void check_access(Launch& L, uintptr_t a, size_t n, bool write, bool atomic) {
  const uintptr_t e = a + n;
  const uintptr_t own = L.stacks.begin + size_t(L.current) * kStackBytes;
  if (a >= own && e <= own + kStackBytes) {
    return;
  }
  if (a >= L.tls.begin && e <= L.tls.end) {
    shadow_access(L, tl_shadow_tls, L.tls.begin, "static", a, n, write, atomic);
    return;
  }
  if (a >= L.dyn.begin && a < L.dyn.begin + tl_dyn.size()) {
    if (e > L.dyn.end) {
      std::ostringstream s;
      s << "out-of-bounds dynamic shared memory " << (write ? "write" : "read") << " of " << n
        << " bytes at byte " << (a - L.dyn.begin) << " of the launch's " << L.smem;
      fail_in_fiber(L, s.str());
    }
    shadow_access(L, tl_shadow_dyn, L.dyn.begin, "dynamic", a, n, write, atomic);
    return;
  }
  if (a >= L.stacks.begin && a < L.stacks.end) {
    std::ostringstream s;
    s << "access to another thread's local memory (thread " << (a - L.stacks.begin) / kStackBytes << ")";
    fail_in_fiber(L, s.str());
  }
  if (a >= L.param.begin && e <= L.param.end) {
    if (write) {
      fail_in_fiber(L, "a write to the kernel's parameters");
    }
    return;
  }
  auto it = std::upper_bound(L.allocs.begin(), L.allocs.end(), a,
                             [](uintptr_t v, const Range& r) { return v < r.begin; });
  if (it != L.allocs.begin()) {
    const Range& r = *(it - 1);
    if (a >= r.begin && e <= r.end) {
      return;
    }
    if (a < r.end + 4096) {
      std::ostringstream s;
      s << "out-of-bounds global " << (write ? "write" : "read") << " of " << n << " bytes at byte "
        << (a - r.begin) << " of an allocation of " << (r.end - r.begin) << " bytes";
      fail_in_fiber(L, s.str());
    }
  }
  std::ostringstream s;
  s << "out-of-bounds global " << (write ? "write" : "read") << " of " << n << " bytes at 0x" << std::hex << a
    << ", inside no tensor";
  fail_in_fiber(L, s.str());
}

inline void on_access(const void* p, size_t n, bool write) {
  Launch* L = tl_launch;
  if (L != nullptr && L->current >= 0 && !L->in_runtime) {
    RuntimeScope scope(*L);
    check_access(*L, reinterpret_cast<uintptr_t>(p), n, write, false);
  }
}

// This module's TLS block in the calling thread: the static shared memory.
Range module_tls() {
  static int anchor;
  Dl_info info{};
  TORCH_CHECK(dladdr(&anchor, &info) != 0, "pymatting_ext CUDA host harness: dladdr failed");
  struct Query {
    void* base;
    Range tls;
  } q{info.dli_fbase, {0, 0}};
  // The block exists in this thread once one of its variables was used.
  [[maybe_unused]] volatile uint64_t touch = tl_serial;
  dl_iterate_phdr(
      [](dl_phdr_info* i, size_t, void* data) -> int {
        auto* q = static_cast<Query*>(data);
        if (reinterpret_cast<void*>(i->dlpi_addr) != q->base) {
          return 0;
        }
        for (int k = 0; k < i->dlpi_phnum; ++k) {
          if (i->dlpi_phdr[k].p_type == PT_TLS && i->dlpi_tls_data != nullptr) {
            const uintptr_t b = reinterpret_cast<uintptr_t>(i->dlpi_tls_data);
            q->tls = {b, b + i->dlpi_phdr[k].p_memsz};
          }
        }
        return 1;
      },
      &q);
  TORCH_CHECK(q.tls.end > q.tls.begin, "pymatting_ext CUDA host harness: could not find the module's TLS block");
  return q.tls;
}

void fiber_main() {
  Launch& L = *tl_launch;
  L.entry(L.params);
  Fiber& f = L.fibers[L.current];
  f.state = State::kExited;
  // A lane that exits while its warp waits for it at a collective: reported
  // when the scheduler finds the warp stuck.
  swapcontext(&f.ctx, &L.sched);
  std::abort();
}

const char* state_name(State s) {
  switch (s) {
    case State::kBarrier:
      return "waits at __syncthreads";
    case State::kWarp:
      return "waits at another warp collective";
    case State::kExited:
      return "has exited";
    default:
      return "runs";
  }
}

// Nothing can run: barrier divergence or a warp collective that cannot
// complete. Raises.
[[noreturn]] void stuck(Launch& L) {
  for (unsigned w = 0; w < L.warps.size(); ++w) {
    const WarpOp& op = L.warps[w];
    if (!op.pending) {
      continue;
    }
    const unsigned missing = op.mask & ~op.arrived;
    const unsigned lane = __builtin_ctz(missing);
    const int tid = int(w * kWarp + lane);
    const int waiter = int(w * kWarp) + __builtin_ctz(op.arrived);
    std::ostringstream s;
    s << "warp collective mask 0x" << std::hex << op.mask << std::dec << " names lane " << lane
      << " (thread " << tid << "), which does not take part: it " << state_name(L.fibers[tid].state);
    TORCH_CHECK(false, "pymatting_ext CUDA host harness: ", s.str(), " (", where(L, waiter), ")");
  }
  int waiting = -1, exited = -1;
  for (unsigned t = 0; t < L.nthreads; ++t) {
    if (L.fibers[t].state == State::kBarrier && waiting < 0) {
      waiting = int(t);
    }
    if (L.fibers[t].state == State::kExited && exited < 0) {
      exited = int(t);
    }
  }
  TORCH_CHECK(false, "pymatting_ext CUDA host harness: barrier divergence: thread ", waiting,
              " (linear) waits at __syncthreads, which thread ", exited,
              " never reaches: it has exited (", where(L, waiting), ")");
}

void run_block(Launch& L) {
  L.serial = ++tl_serial;
  L.epoch = 0;
  std::fill(L.warp_sync.begin(), L.warp_sync.end(), 0u);
  for (auto& w : L.warps) {
    w.pending = false;
  }
  for (unsigned t = 0; t < L.nthreads; ++t) {
    Fiber& f = L.fibers[t];
    f.state = State::kRunnable;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = tl_stacks + size_t(t) * kStackBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, &fiber_main, 0);
  }
  for (;;) {
    bool ran = false;
    for (unsigned t = 0; t < L.nthreads; ++t) {
      if (L.fibers[t].state != State::kRunnable) {
        continue;
      }
      L.current = int(t);
      swapcontext(&L.sched, &L.fibers[t].ctx);
      L.current = -1;
      ran = true;
      if (L.failed) {
        TORCH_CHECK(false, "pymatting_ext CUDA host harness: ", L.error);
      }
    }
    if (ran) {
      continue;
    }
    unsigned at_barrier = 0, exited = 0;
    for (const Fiber& f : L.fibers) {
      at_barrier += f.state == State::kBarrier;
      exited += f.state == State::kExited;
    }
    if (exited == L.nthreads) {
      return;
    }
    if (at_barrier == L.nthreads) {
      ++L.epoch;
      for (Fiber& f : L.fibers) {
        f.state = State::kRunnable;
      }
      continue;
    }
    stuck(L);
  }
}

void append_line(const char* var, const std::string& line) {
  const char* path = std::getenv(var);
  if (path == nullptr || *path == '\0') {
    return;
  }
  FILE* f = std::fopen(path, "a");
  TORCH_CHECK(f != nullptr, "pymatting_ext CUDA host harness: cannot append to ", var, "=", path);
  std::fprintf(f, "%s\n", line.c_str());
  std::fclose(f);
}

// PYMATTING_EXT_CUDA_HOST_REPORT: each launch's kernel name, a line each.
// PYMATTING_EXT_CUDA_HOST_LAUNCHES: the name and the block's threads (the
// tests hold them against the kernels' __launch_bounds__, which g++ drops).
void append_report(const std::string& name, dim3 block) {
  const std::string base = name.substr(0, name.find('<'));
  append_line("PYMATTING_EXT_CUDA_HOST_REPORT", base);
  append_line("PYMATTING_EXT_CUDA_HOST_LAUNCHES", base + " " + std::to_string(uint64_t(block.x) * block.y * block.z));
}

std::mutex g_launch_mutex;

}  // namespace

uint3 thread_idx() {
  const Launch& L = kernel_launch();
  const unsigned t = unsigned(L.current), bx = L.block.x, by = L.block.y;
  return {t % bx, (t / bx) % by, t / (bx * by)};
}
uint3 block_idx() { return kernel_launch().block_idx; }
dim3 block_dim() { return kernel_launch().block; }
dim3 grid_dim() { return kernel_launch().grid; }

void* dynamic_shared() { return reinterpret_cast<void*>(kernel_launch().dyn.begin); }

int64_t sm_count() {
  // A pretend device of a few SMs, so that grid-stride loops and the
  // multi-block selections take several rounds on small inputs.
  const char* v = std::getenv("PYMATTING_EXT_CUDA_HOST_SMS");
  const long n = v != nullptr ? std::strtol(v, nullptr, 10) : 2;
  return n >= 1 ? n : 2;
}

void syncthreads() {
  Launch& L = kernel_launch();
  Fiber& f = L.fibers[L.current];
  f.state = State::kBarrier;
  swapcontext(&f.ctx, &L.sched);
}

unsigned match_any(unsigned mask, uint64_t value) {
  Launch& L = kernel_launch();
  RuntimeScope scope(L);
  const unsigned t = unsigned(L.current), w = t / kWarp, lane = t % kWarp;
  const unsigned lanes = std::min(kWarp, L.nthreads - w * kWarp);
  const unsigned present = lanes == kWarp ? ~0u : ((1u << lanes) - 1u);
  std::ostringstream s;
  if (!(mask & (1u << lane))) {
    s << "__match_any_sync: the mask 0x" << std::hex << mask << " leaves out the calling lane " << std::dec << lane;
    fail_in_fiber(L, s.str());
  }
  if (mask & ~present) {
    s << "__match_any_sync: the mask 0x" << std::hex << mask << " names lanes that this warp does not have";
    fail_in_fiber(L, s.str());
  }
  WarpOp& op = L.warps[w];
  if (op.pending && op.mask != mask) {
    s << "__match_any_sync: lanes of one warp wait with different masks (0x" << std::hex << op.mask << " and 0x"
      << mask << ")";
    fail_in_fiber(L, s.str());
  }
  for (unsigned k = 0; k < kWarp; ++k) {
    if ((mask & (1u << k)) && L.fibers[w * kWarp + k].state == State::kExited) {
      s << "__match_any_sync: the mask 0x" << std::hex << mask << std::dec << " names lane " << k
        << ", which has exited";
      fail_in_fiber(L, s.str());
    }
  }
  if (!op.pending) {
    op.pending = true;
    op.mask = mask;
    op.arrived = 0;
  }
  op.arrived |= 1u << lane;
  op.value[lane] = value;
  if (op.arrived == mask) {
    for (unsigned k = 0; k < kWarp; ++k) {
      if (!(mask & (1u << k))) {
        continue;
      }
      unsigned peers = 0;
      for (unsigned j = 0; j < kWarp; ++j) {
        if ((mask & (1u << j)) && op.value[j] == op.value[k]) {
          peers |= 1u << j;
        }
      }
      op.result[k] = peers;
      if (k != lane) {
        L.fibers[w * kWarp + k].state = State::kRunnable;
      }
    }
    op.pending = false;
    ++L.warp_sync[w];
    return op.result[lane];
  }
  Fiber& f = L.fibers[t];
  f.state = State::kWarp;
  L.in_runtime = false;  // the other fibers run kernel code meanwhile
  swapcontext(&f.ctx, &L.sched);
  L.in_runtime = true;
  return op.result[lane];
}

void device_assert(const char* msg, const char* file, int line) {
  Launch& L = kernel_launch();
  RuntimeScope scope(L);
  std::ostringstream s;
  s << "device-side assertion failed: " << msg << " (" << file << ":" << line << ")";
  fail_in_fiber(L, s.str());
}

unsigned atomic_add(unsigned* p, unsigned v) {
  Launch& L = kernel_launch();
  RuntimeScope scope(L);
  check_access(L, reinterpret_cast<uintptr_t>(p), sizeof(*p), true, true);
  const unsigned old = *p;
  *p = old + v;
  return old;
}

unsigned long long atomic_add(unsigned long long* p, unsigned long long v) {
  Launch& L = kernel_launch();
  RuntimeScope scope(L);
  check_access(L, reinterpret_cast<uintptr_t>(p), sizeof(*p), true, true);
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

int atomic_max(int* p, int v) {
  Launch& L = kernel_launch();
  RuntimeScope scope(L);
  check_access(L, reinterpret_cast<uintptr_t>(p), sizeof(*p), true, true);
  const int old = *p;
  *p = std::max(old, v);
  return old;
}

void run(const char* pretty, dim3 grid, dim3 block, size_t smem, Entry entry, void* params,
         size_t params_bytes) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Launch L;
  L.name = short_name(pretty);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  // The driver's launch checks (cudaErrorInvalidConfiguration).
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "pymatting_ext CUDA host harness: ", L.name,
              ": invalid launch: block ", dim_str(block.x, block.y, block.z), " (1 to 1024 threads, z at most 64)");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7FFFFFFFu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "pymatting_ext CUDA host harness: ", L.name, ": invalid launch: grid ", dim_str(grid.x, grid.y, grid.z),
              " (x below 2^31, y and z at most 65535, none 0)");
  TORCH_CHECK(smem <= kMaxSharedBytes, "pymatting_ext CUDA host harness: ", L.name, ": invalid launch: ", smem,
              " bytes of dynamic shared memory, more than 48 KiB without the opt-in");
  append_report(L.name, block);
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.entry = entry;
  L.params = params;
  L.params_bytes = params_bytes;
  L.nthreads = unsigned(threads);
  L.fibers.resize(L.nthreads);
  const unsigned nwarps = (L.nthreads + kWarp - 1) / kWarp;
  L.warp_sync.assign(nwarps, 0);
  L.warps.assign(nwarps, WarpOp{});

  if (tl_stack_count < L.nthreads) {
    std::free(tl_stacks);
    tl_stacks = static_cast<char*>(std::aligned_alloc(4096, size_t(L.nthreads) * kStackBytes));
    TORCH_CHECK(tl_stacks != nullptr, "pymatting_ext CUDA host harness: out of memory for fiber stacks");
    tl_stack_count = L.nthreads;
  }
  L.stacks = {reinterpret_cast<uintptr_t>(tl_stacks),
              reinterpret_cast<uintptr_t>(tl_stacks) + size_t(L.nthreads) * kStackBytes};
  L.tls = module_tls();
  if (tl_shadow_tls.size() < L.tls.end - L.tls.begin) {
    tl_shadow_tls.resize(L.tls.end - L.tls.begin);
  }
  // The dynamic arena is 16-byte aligned, with room past the launch's bytes
  // so that overruns land in it and are reported.
  tl_dyn.assign(((smem + 15) / 16) * 16 + 4096 + 16, 0xA5);
  const uintptr_t dyn0 = (reinterpret_cast<uintptr_t>(tl_dyn.data()) + 15) & ~uintptr_t(15);
  L.dyn = {dyn0, dyn0 + smem};
  if (tl_shadow_dyn.size() < smem) {
    tl_shadow_dyn.resize(smem);
  }
  L.param = {reinterpret_cast<uintptr_t>(params), reinterpret_cast<uintptr_t>(params) + params_bytes};
  {
    std::lock_guard<std::mutex> alloc_lock(g_alloc_mutex);
    L.allocs.reserve(g_allocs.size());
    for (const auto& [b, a] : g_allocs) {
      if (a.bytes > 0) {
        L.allocs.push_back({b, b + a.bytes});
      }
    }
  }

  Launch* saved = tl_launch;
  tl_launch = &L;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          L.block_idx = {x, y, z};
          run_block(L);
        }
      }
    }
  } catch (...) {
    tl_launch = saved;
    throw;
  }
  tl_launch = saved;
}

TORCH_LIBRARY_FRAGMENT(pymatting_ext_cuda_host, m) {
  m.def("track_allocations(bool on) -> ()", &track_allocations);
}

}  // namespace pmx_host

// -- the callbacks of the kernels' instrumentation ----------------------------
//
// -fsanitize=thread makes g++ call these around every load and store (and
// function entry/exit, and atomics) of the kernel translation units; this is
// a harness of its own, not ThreadSanitizer's runtime.

using pmx_host::on_access;

extern "C" {

#define PMX_ACCESS(n)                                                                 \
  void __tsan_read##n(void* p) { on_access(p, n, false); }                            \
  void __tsan_write##n(void* p) { on_access(p, n, true); }                            \
  void __tsan_unaligned_read##n(void* p) { on_access(p, n, false); }                  \
  void __tsan_unaligned_write##n(void* p) { on_access(p, n, true); }                  \
  void __tsan_volatile_read##n(void* p) { on_access(p, n, false); }                   \
  void __tsan_volatile_write##n(void* p) { on_access(p, n, true); }                   \
  void __tsan_unaligned_volatile_read##n(void* p) { on_access(p, n, false); }         \
  void __tsan_unaligned_volatile_write##n(void* p) { on_access(p, n, true); }
PMX_ACCESS(1)
PMX_ACCESS(2)
PMX_ACCESS(4)
PMX_ACCESS(8)
PMX_ACCESS(16)
#undef PMX_ACCESS

// The host code's own atomics (reference counts): performed as asked, not
// checked.
#define PMX_ATOMICS(bits, T)                                                                              \
  T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                              \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                        \
  T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                                             \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                                             \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                                             \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                                              \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                        \
  T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                                             \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                  \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                    \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                        \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
    return c;                                                                                              \
  }
PMX_ATOMICS(8, uint8_t)
PMX_ATOMICS(16, uint16_t)
PMX_ATOMICS(32, uint32_t)
PMX_ATOMICS(64, uint64_t)
#undef PMX_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, true); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

// UBSan's misaligned-access report (-fsanitize=alignment, not recoverable).
struct PmxSourceLocation {
  const char* file;
  unsigned line, column;
};
struct PmxTypeDescriptor {
  unsigned short kind, info;
  char name[1];
};
struct PmxTypeMismatchData {
  PmxSourceLocation loc;
  const PmxTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};

void __ubsan_handle_type_mismatch_v1_abort(PmxTypeMismatchData* d, uintptr_t ptr) {
  pmx_host::Launch* L = pmx_host::tl_launch;
  if (L != nullptr && L->current >= 0) {
    L->in_runtime = true;  // for good: the fiber is not resumed
  }
  std::ostringstream s;
  s << "misaligned access: " << d->type->name << " at 0x" << std::hex << ptr << std::dec << " needs "
    << (1u << d->log_alignment) << "-byte alignment (" << d->loc.file << ":" << d->loc.line << ")";
  if (L != nullptr && L->current >= 0) {
    pmx_host::fail_in_fiber(*L, s.str());
  }
  std::fprintf(stderr, "pymatting_ext CUDA host harness: %s, outside a kernel\n", s.str().c_str());
  std::abort();
}

}  // extern "C"
