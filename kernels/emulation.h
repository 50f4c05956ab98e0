// A CPU emulation of the small CUDA subset kernels/sampling.cu uses, so the real kernel source can be compiled
// with a C++20 compiler and run on a CPU in the tests (kernels/emulate.py). It checks the kernels' logic
// (indexing, block reductions, the bisection, Philox, tie-breaking) against the PyTorch references where no
// GPU is available; it says nothing about GPU-specific behaviour (memory model, scheduling, performance).
//
// Model: one OS thread. Blocks run one after another; the CUDA threads of a block are cooperative fibers
// (ucontext) scheduled round-robin. __syncthreads is a barrier over the block's fibers; __shfl_xor_sync
// exchanges values through a per-warp buffer between two warp barriers (every shuffle in sampling.cu is
// executed by all 32 lanes of a warp). __shared__ variables are static: only one block is live at a time.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct cvqd_dim3 { unsigned x, y, z; };
inline cvqd_dim3 threadIdx{0, 0, 0};  // set by the scheduler before it resumes a fiber
inline cvqd_dim3 blockIdx{0, 0, 0};
inline cvqd_dim3 blockDim{1, 1, 1};

namespace cvqd_emu {
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};
struct Barrier {
  unsigned expected = 0, count = 0;
  unsigned long generation = 0;
};
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline unsigned current = 0;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
inline std::vector<uint64_t> warp_slots;  // [threads]: the value each lane offers to the current shuffle
inline const std::function<void()>* body = nullptr;

inline void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

inline void arrive_and_wait(Barrier& b) {
  const unsigned long gen = b.generation;
  if (++b.count == b.expected) {  // the last one in releases everybody
    b.count = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline void trampoline() {
  (*body)();
  fibers[current].done = true;  // returning resumes uc_link: the scheduler
}
}  // namespace cvqd_emu

inline void __syncthreads() { cvqd_emu::arrive_and_wait(cvqd_emu::block_barrier); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  cvqd_emu::warp_slots[t] = raw;
  cvqd_emu::arrive_and_wait(cvqd_emu::warp_barriers[warp]);
  raw = cvqd_emu::warp_slots[warp * 32 + (lane ^ (unsigned)lane_mask)];
  cvqd_emu::arrive_and_wait(cvqd_emu::warp_barriers[warp]);  // nobody overwrites a slot before its partner read it
  T out;
  std::memcpy(&out, &raw, sizeof(T));
  return out;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * (uint64_t)b) >> 32); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
using std::isinf;

// Run `fn` as a grid (gx, gy) of blocks of `threads` CUDA threads.
inline void cvqd_emulate_launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& fn) {
  using namespace cvqd_emu;
  constexpr size_t kStack = 256 * 1024;
  body = &fn;
  fibers.assign(threads, Fiber{});
  for (auto& f : fibers) f.stack.resize(kStack);
  warp_slots.assign(threads, 0);
  blockDim = {threads, 1, 1};
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      blockIdx = {bx, by, 0};
      block_barrier = Barrier{threads, 0, 0};
      warp_barriers.assign((threads + 31) / 32, Barrier{32, 0, 0});
      for (auto& f : fibers) {
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &scheduler;
        f.done = false;
        makecontext(&f.ctx, trampoline, 0);
      }
      for (unsigned alive = threads; alive > 0;) {
        alive = 0;
        for (unsigned t = 0; t < threads; ++t) {
          if (fibers[t].done) continue;
          current = t;
          threadIdx = {t, 0, 0};
          swapcontext(&scheduler, &fibers[t].ctx);
          alive += !fibers[t].done;
        }
      }
    }
  }
}
