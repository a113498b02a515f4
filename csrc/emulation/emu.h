// emu.h: a CPU emulation of CUDA's block execution model, used to RUN the real kernel bodies
// of csrc/pama_cuda_kernels.cu with g++ (see csrc/emulation/emulate.py and csrc/README.md).
//
// Why: CI machines have no GPU (only nvcc and g++), so nvcc can compile the kernels but nothing
// can execute them. emulate.py cuts the device part out of the .cu, rewrites each `__shared__`
// declaration into a block-shared array of this header, and compiles the kernel bodies
// UNCHANGED against the definitions below (threadIdx, __syncthreads, __shfl_down_sync, ...).
//
// What is modelled:
//   * a grid runs block after block; the threads of one block are coroutines on one OS thread
//     (started with ucontext, switched with _setjmp/_longjmp, which needs no syscall);
//   * a thread runs until its next synchronisation point (__syncthreads, a shuffle, its end);
//     each such phase runs the runnable threads in one of three orders (Schedule): forward,
//     reverse or random, so a missing barrier shows up as schedule-dependent results;
//   * __syncthreads is released only when every thread of the block waits at one; it fails
//     on a differing barrier count per thread, on a barrier some threads exited before, and on
//     threads waiting at barriers of different source lines (divergent __syncthreads);
//   * __shfl_down_sync needs the full mask and all 32 lanes of the warp at a shuffle of the
//     same sequence number (anything else is a deadlock and fails); a source lane past 31
//     returns the caller's own value, as on hardware;
//   * shared memory: every shared array is filled with 0xFF bytes (NaN, -1, 255) at the
//     start of each block, and indexing it is bounds-checked (SharedArray); the dynamic
//     buffer (extern __shared__) is a heap buffer of exactly the launch's size;
//   * each thread's stack has a guard page below it, so a stack overflow faults.
// What is NOT modelled: the memory model of real hardware (here a write is visible to
// every thread as soon as it is made; weak ordering, caches and the visibility rules of
// __threadfence are not simulated), nvcc's code generation (FMA contraction, intrinsics'
// rounding, registers, __launch_bounds__, occupancy), lockstep execution of a warp outside
// shuffles (no warp-synchronous code is assumed), concurrent blocks (cross-block races are
// not detected), atomics, 2-D/3-D grids and blocks.
#pragma once
#if defined(_FORTIFY_SOURCE) && _FORTIFY_SOURCE > 0
#error "build with -U_FORTIFY_SOURCE: the fortified longjmp rejects the switches between thread stacks"
#endif
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace emu {

struct Dim3 { unsigned x, y, z; };
inline Dim3 thread_idx, block_idx, block_dim, grid_dim;
// the dynamic shared buffer of the launch (extern __shared__), nullptr for 0 bytes
inline double* dynamic_shared = nullptr;

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };
inline Schedule schedule = Schedule::kForward;
inline std::mt19937 schedule_rng(1);

[[noreturn]] inline void fail(const char* what);

// ---- shared memory: registered arrays, poisoned at the start of every block
struct SharedRegion { void* p; size_t bytes; };
inline std::vector<SharedRegion>& shared_regions() { static std::vector<SharedRegion> r; return r; }
struct RegisterShared {
  RegisterShared(void* p, size_t bytes) { shared_regions().push_back({p, bytes}); memset(p, 0xFF, bytes); }
};

// ---- threads
enum class State { kRunnable, kAtBarrier, kAtShuffle, kDone };
struct Thread {
  ucontext_t start_ctx;  // used once, to enter the kernel on this thread's stack
  jmp_buf resume;        // where the thread continues after a synchronisation point
  bool started;
  State state;
  int barrier_line;      // __LINE__ of the barrier it waits at
  long barriers;         // barriers passed so far
  long shuffles;         // shuffle phases passed so far
};
constexpr size_t kStackBytes = 256 * 1024;
inline std::vector<Thread> threads;
inline std::vector<char*> stacks;  // each with a PROT_NONE guard page below it
inline int n_threads = 0;
inline int current = 0;
inline jmp_buf scheduler;
inline ucontext_t scheduler_ctx;
inline std::function<void()> kernel_body;
inline uint64_t shuffle_values[32][32];  // [warp][lane]: the value each lane offers

[[noreturn]] inline void fail(const char* what) {
  fprintf(stderr, "EMU FAIL: %s (block %u, thread %d)\n", what, block_idx.x, current);
  abort();
}

// back to the scheduler; returns when the scheduler resumes this thread
inline void yield_to_scheduler() {
  if (!_setjmp(threads[current].resume)) _longjmp(scheduler, 1);
  thread_idx.x = current;
}
inline void syncthreads(int line) {
  Thread& t = threads[current];
  t.state = State::kAtBarrier;
  t.barrier_line = line;
  t.barriers++;
  yield_to_scheduler();
}
template <class T>
T shfl_down_sync(unsigned mask, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) fail("__shfl_down_sync with a partial mask (not emulated)");
  const int lane = current & 31, warp = current >> 5;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  shuffle_values[warp][lane] = bits;
  threads[current].state = State::kAtShuffle;  // every lane has offered its value...
  threads[current].shuffles++;
  yield_to_scheduler();
  T r = v;
  if (lane + offset < 32) memcpy(&r, &shuffle_values[warp][lane + offset], sizeof(T));
  threads[current].state = State::kAtShuffle;  // ...and every lane has read before reuse
  threads[current].shuffles++;
  yield_to_scheduler();
  return r;
}

inline void thread_entry() {
  kernel_body();
  threads[current].state = State::kDone;
  _longjmp(scheduler, 1);
}

inline void ensure_threads(int n) {
  if ((int)threads.size() < n) threads.resize(n);
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  while ((int)stacks.size() < n) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("mmap of a thread stack failed");
    mprotect(m, page, PROT_NONE);  // stacks grow down: overflow hits the guard page
    stacks.push_back(static_cast<char*>(m) + page);
  }
}

inline void resume_thread(int t) {
  current = t;
  thread_idx.x = t;
  if (_setjmp(scheduler)) return;  // the thread yielded or finished
  if (!threads[t].started) {
    threads[t].started = true;
    swapcontext(&scheduler_ctx, &threads[t].start_ctx);  // never returns here
    fail("thread returned through its start context");
  }
  _longjmp(threads[t].resume, 1);
}

// releases the warps whose 32 lanes all wait at a shuffle; true when one was released
inline bool release_shuffles() {
  bool released = false;
  for (int w = 0; w < n_threads / 32; ++w) {
    int waiting = 0;
    for (int l = 0; l < 32; ++l) waiting += threads[w * 32 + l].state == State::kAtShuffle;
    if (waiting != 32) continue;
    const long seq = threads[w * 32].shuffles;
    for (int l = 0; l < 32; ++l) {
      if (threads[w * 32 + l].shuffles != seq) fail("lanes of a warp at different shuffles");
      threads[w * 32 + l].state = State::kRunnable;
    }
    released = true;
  }
  return released;
}

inline void run_block(unsigned block, unsigned block_threads, unsigned grid) {
  if (block_threads % 32 != 0 || block_threads > 1024) fail("block size must be a multiple of 32, at most 1024");
  n_threads = (int)block_threads;
  ensure_threads(n_threads);
  block_idx = {block, 0, 0};
  block_dim = {block_threads, 1, 1};
  grid_dim = {grid, 1, 1};
  for (auto& r : shared_regions()) memset(r.p, 0xFF, r.bytes);
  for (int t = 0; t < n_threads; ++t) {
    Thread& th = threads[t];
    getcontext(&th.start_ctx);
    th.start_ctx.uc_stack.ss_sp = stacks[t];
    th.start_ctx.uc_stack.ss_size = kStackBytes;
    th.start_ctx.uc_link = nullptr;  // thread_entry never returns
    makecontext(&th.start_ctx, thread_entry, 0);
    th.started = false;
    th.state = State::kRunnable;
    th.barrier_line = 0;
    th.barriers = 0;
    th.shuffles = 0;
  }
  std::vector<int> order;
  for (;;) {
    order.clear();
    for (int t = 0; t < n_threads; ++t)
      if (threads[t].state == State::kRunnable) order.push_back(t);
    if (!order.empty()) {
      if (schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
      if (schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), schedule_rng);
      for (int t : order) resume_thread(t);
      continue;
    }
    if (release_shuffles()) continue;
    int at_barrier = 0, done = 0, at_shuffle = 0;
    for (int t = 0; t < n_threads; ++t) {
      at_barrier += threads[t].state == State::kAtBarrier;
      done += threads[t].state == State::kDone;
      at_shuffle += threads[t].state == State::kAtShuffle;
    }
    if (done == n_threads) return;
    if (at_shuffle) fail("deadlock: lanes at a full-mask shuffle while others of the warp are at a barrier or exited");
    if (done) fail("__syncthreads reached while other threads of the block have exited");
    for (int t = 0; t < n_threads; ++t) {
      if (threads[t].barriers != threads[0].barriers) fail("threads at different __syncthreads counts (divergent barrier)");
      if (threads[t].barrier_line != threads[0].barrier_line) fail("threads at __syncthreads of different source lines (divergent barrier)");
      threads[t].state = State::kRunnable;
    }
  }
}

// kernel<<<grid, block, dynamic_bytes>>>: body is the kernel call; the caller sets
// dynamic_shared to a buffer of dynamic_bytes (or nullptr) beforehand
template <class F>
void launch(unsigned grid, unsigned block_threads, F body) {
  kernel_body = body;
  for (unsigned b = 0; b < grid; ++b) run_block(b, block_threads, grid);
}

// a __shared__ array: one instance per kernel instantiation (a function-local static),
// bounds-checked indexing, decays to a pointer like the array it replaces
template <class T, long N>
struct SharedArray {
  T data[N];
  template <class I>
  T& operator[](I i) {
    if (i < 0 || (long)i >= N) {
      fprintf(stderr, "EMU FAIL: shared array index %ld out of [0, %ld) (block %u, thread %d)\n", (long)i, N, block_idx.x, current);
      abort();
    }
    return data[i];
  }
  operator T*() { return data; }
};

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __syncthreads() emu::syncthreads(__LINE__)
#define __shfl_down_sync(mask, v, offset) emu::shfl_down_sync(mask, v, offset)
// registers a shared array for poisoning (once per kernel instantiation)
#define EMU_SHARED(name) static emu::RegisterShared emu_shared_##name(&name, sizeof(name))
