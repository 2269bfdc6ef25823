// A CPU emulator for the small subset of CUDA that ext/stats_cuda_kernel.cu uses, so the kernel's logic (thread
// split, vectorised loads and tails, warp shuffles, the shared-memory merge, degenerate rows) is tested on any
// machine. Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// Sync points are checked as strictly as the hardware's rules: a shuffle waits for every lane of its warp, a
// __syncthreads for every thread of its block; a lane that has exited while others wait at a shuffle or barrier,
// or no thread able to move on, is reported as a launch error (cudaGetLastError), not a hang.
// Not emulated: timing, memory coalescing, the device's own exp2f rounding (glibc's is used).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;

enum class State { Ready, AtShuffle, AtBarrier, Done };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  State state = State::Ready;
  long shuffles = 0;  // shuffles this thread has arrived at
  long barriers = 0;  // __syncthreads this thread has arrived at
};

struct Emulator {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<uint64_t> shuffle_slots;  // [warp][2][lane], double-buffered by shuffle number
  ucontext_t scheduler;
  Fiber* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
  int error = 0;
  std::string message;
};

inline Emulator& emu() {
  static Emulator e;
  return e;
}

inline Fiber* current() { return emu().current; }

inline void fail(const std::string& why) {
  Emulator& e = emu();
  if (e.error == 0) {
    e.error = 999;
    e.message = why;
  }
}

inline void yield() { swapcontext(&current()->ctx, &emu().scheduler); }

inline bool releasable(const Fiber& f, size_t index) {
  Emulator& e = emu();
  if (f.state == State::Ready) return true;
  if (f.state == State::AtShuffle) {
    const size_t warp = index / kWarp, first = warp * kWarp, last = std::min(first + kWarp, e.fibers.size());
    for (size_t j = first; j < last; ++j) {
      const Fiber& g = e.fibers[j];
      if (g.shuffles >= f.shuffles) continue;
      if (g.state == State::Done) fail("a shuffle waits for a lane that has exited");
      return false;
    }
    return true;
  }
  if (f.state == State::AtBarrier) {
    for (const Fiber& g : e.fibers) {
      if (g.barriers >= f.barriers) continue;
      if (g.state == State::Done) fail("__syncthreads waits for a thread that has exited");
      return false;
    }
    return true;
  }
  return false;
}

inline void entry() {
  emu().body();
  current()->state = State::Done;
}  // returns to the scheduler through uc_link

inline void run_block() {
  Emulator& e = emu();
  const size_t n = e.fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = e.fibers[i];
    f = Fiber{};
    f.tid = dim3(static_cast<unsigned>(i), 0, 0);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = e.stacks[i].data();
    f.ctx.uc_stack.ss_size = e.stacks[i].size();
    f.ctx.uc_link = &e.scheduler;
    makecontext(&f.ctx, entry, 0);
  }
  while (e.error == 0) {
    bool all_done = true, moved = false;
    for (size_t i = 0; i < n && e.error == 0; ++i) {
      Fiber& f = e.fibers[i];
      if (f.state == State::Done) continue;
      all_done = false;
      if (!releasable(f, i)) continue;
      f.state = State::Ready;
      e.current = &f;
      swapcontext(&e.scheduler, &f.ctx);
      e.current = nullptr;
      moved = true;
    }
    if (all_done) return;
    if (!moved) fail("deadlock: every live thread waits at a shuffle or barrier that cannot complete");
  }
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t /*shared_bytes*/, void* /*stream*/, Args... args) {
  Emulator& e = emu();
  if (e.error != 0) return;
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) return fail("only 1-D grids and blocks");
  if (block.x == 0 || block.x > 1024) return fail("block size out of range");
  e.grid_dim = grid;
  e.block_dim = block;
  e.fibers.assign(block.x, Fiber{});
  e.stacks.resize(block.x);
  for (auto& s : e.stacks) s.resize(kStack);
  e.shuffle_slots.assign((block.x + kWarp - 1) / kWarp * 2 * kWarp, 0);
  e.body = [&] { kernel(args...); };
  for (unsigned b = 0; b < grid.x && e.error == 0; ++b) {
    e.block_idx = dim3{b, 0, 0};
    run_block();
  }
  e.body = nullptr;
}

template <class T>
T shfl_down(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of more than 8 bytes");
  if (mask != 0xffffffffu) fail("only full-warp shuffles are emulated");
  Emulator& e = emu();
  Fiber* f = current();
  const size_t lane = f->tid.x % kWarp, warp = f->tid.x / kWarp;
  const long n = ++f->shuffles;
  uint64_t* slots = e.shuffle_slots.data() + (warp * 2 + (n & 1)) * kWarp;
  uint64_t raw = 0;
  std::memcpy(&raw, &value, sizeof(T));
  slots[lane] = raw;
  f->state = State::AtShuffle;
  yield();
  const size_t src = lane + delta < kWarp ? lane + delta : lane;
  T out;
  std::memcpy(&out, &slots[src], sizeof(T));
  return out;
}

inline void syncthreads() {
  Fiber* f = current();
  ++f->barriers;
  f->state = State::AtBarrier;
  yield();
}

}  // namespace cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::cuda_emu::current()->tid)
#define blockIdx (::cuda_emu::emu().block_idx)
#define blockDim (::cuda_emu::emu().block_dim)
#define gridDim (::cuda_emu::emu().grid_dim)
#define warpSize 32
#define __syncthreads() ::cuda_emu::syncthreads()
#define __shfl_down_sync(mask, value, delta) ::cuda_emu::shfl_down((mask), (value), (delta))

using std::isfinite;
