// A tiny host emulation of the CUDA features the bnorm kernels use, so the real kernel
// sources (kernels/*.cu) compile with g++ and run on the CPU: every CUDA thread of a block
// is a fiber (ucontext), __syncthreads is a block barrier, warp shuffles go through a
// per-warp buffer and barrier, and blocks run one after another (so `static` serves as
// __shared__, and the last-block handshake sees every other block's partials, as on a
// GPU). Fibers switch only at barriers: deterministic, and fast on any core count.
//
// A cooperative launch (emu_launch_cooperative) runs every block of the grid side by side
// instead: all its threads are fibers of one scheduler, each block with its own dynamic
// shared memory, block barrier and warp buffers, so a grid-wide barrier (kernels that
// spin on a counter call bn_pause(), which yields here) works as on a GPU. Kernels run that
// way must not use static __shared__ (the persistent kernels use dynamic shared memory only).
//
// This checks the kernels' logic (indexing, tails, vector and scalar paths, splits and
// the cross-block merge, fused paths, counter reset) without a GPU. It says nothing about
// timing, the memory model under real concurrency, or the PTX compiler; see docs/cuda.md.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <vector>

#define BN_HOST_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

struct EmuDim {
  unsigned x, y, z;
};
// One OS thread runs every CUDA thread of a block as a fiber; the scheduler sets these
// before it switches to a fiber.
inline EmuDim threadIdx, blockIdx, blockDim, gridDim;

// Dynamic shared memory: one buffer per resident block, refilled with NaN before the block
// runs; the scheduler points g_emu_smem_ptr at the running fiber's block's buffer.
inline std::vector<std::vector<float>> g_emu_smem;
inline float* g_emu_smem_ptr = nullptr;
#define BN_DYNAMIC_SMEM(name) float* name = g_emu_smem_ptr

// ---------------------------------------------------------------- fibers
// A fiber is entered once through makecontext/swapcontext; after that fibers and the
// scheduler switch with _setjmp/_longjmp, which (unlike swapcontext) make no system call.
// Build without _FORTIFY_SOURCE (its longjmp check rejects jumps between stacks).
struct EmuBarrier {
  unsigned n = 0, arrived = 0, generation = 0;
};
struct EmuFiber {
  ucontext_t ctx;
  jmp_buf jb;
  std::unique_ptr<char[]> stack;  // not value-initialized: pages are committed as touched
  bool started = false, done = false;
  EmuDim tid, bid;
  unsigned slot = 0;  // index of its block among the resident ones
};
struct EmuBlock {
  EmuBarrier barrier;
  std::vector<EmuBarrier> warp_barriers;
  float warp_vals[8][32];
};
constexpr size_t kEmuStack = 128 * 1024;
inline std::vector<EmuFiber> g_fibers;
inline std::vector<EmuBlock> g_blocks;
inline ucontext_t g_sched_ctx;
inline jmp_buf g_sched_jb;
inline unsigned g_current = 0;
inline std::function<void()> g_job;

inline void emu_yield() {
  if (!_setjmp(g_fibers[g_current].jb)) _longjmp(g_sched_jb, 1);
}

// Completed barriers and finished fibers: the scheduler's measure of progress.
inline unsigned long long g_progress = 0;

inline void emu_wait(EmuBarrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.generation;
    ++g_progress;
    return;
  }
  while (b.generation == gen) emu_yield();
}

inline unsigned emu_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }
inline EmuBlock& emu_block() { return g_blocks[g_fibers[g_current].slot]; }

inline void __syncthreads() { emu_wait(emu_block().barrier); }
inline void __threadfence() {}
// Spin-wait hint of the kernels (device: nanosleep); here: let the other fibers run.
inline void bn_pause() { emu_yield(); }

inline float __shfl_down_sync(unsigned, float v, int off) {
  const unsigned tid = emu_tid(), warp = tid / 32, lane = tid % 32;
  EmuBlock& b = emu_block();
  b.warp_vals[warp][lane] = v;
  emu_wait(b.warp_barriers[warp]);
  const float r = lane + off < 32 ? b.warp_vals[warp][lane + off] : v;
  emu_wait(b.warp_barriers[warp]);
  return r;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline float __frcp_rn(float x) { return 1.0f / x; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void __trap() { std::abort(); }

struct float4 {
  float x, y, z, w;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline float emu_f16_to_f32(unsigned short v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return (float)h;
}
inline unsigned short emu_f32_to_f16(float f) {
  _Float16 h = (_Float16)f;
  unsigned short v;
  std::memcpy(&v, &h, 2);
  return v;
}

inline void emu_fiber_main() {
  g_job();
  g_fibers[g_current].done = true;
  ++g_progress;
  _longjmp(g_sched_jb, 1);  // never returns
}

// Run `blocks` (linear block indices) side by side: each block's threads are fibers that
// the scheduler resumes round-robin, each running until it waits at a barrier (or spins
// in bn_pause) or ends.
inline void emu_run_blocks(const std::vector<unsigned>& blocks, EmuDim grid, EmuDim block, size_t smem_bytes) {
  const unsigned threads = block.x * block.y * block.z;
  const size_t nf = (size_t)threads * blocks.size();
  if (g_fibers.size() < nf) g_fibers.resize(nf);
  g_blocks.resize(std::max(g_blocks.size(), blocks.size()));
  if (g_emu_smem.size() < blocks.size()) g_emu_smem.resize(blocks.size());
  for (size_t b = 0; b < blocks.size(); ++b) {
    const unsigned lin = blocks[b];
    const EmuDim bid{lin % grid.x, (lin / grid.x) % grid.y, lin / (grid.x * grid.y)};
    g_emu_smem[b].assign(smem_bytes / 4 + 1, std::nanf(""));
    g_blocks[b].barrier = EmuBarrier{threads, 0, 0};
    g_blocks[b].warp_barriers.assign(threads / 32, EmuBarrier{32, 0, 0});
    for (unsigned t = 0; t < threads; ++t) {
      EmuFiber& f = g_fibers[b * threads + t];
      if (!f.stack) f.stack.reset(new char[kEmuStack]);
      f.done = false;
      f.started = false;
      f.slot = (unsigned)b;
      f.bid = bid;
      f.tid = EmuDim{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kEmuStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, emu_fiber_main, 0);
    }
  }
  // One block at a time, each as far as it gets (until a whole pass over its fibers
  // completes no barrier: it waits for other blocks), so blocks run far out of step with
  // each other, as they may on a GPU: a missing grid-wide barrier shows.
  auto resume = [&](size_t i) {
    EmuFiber& f = g_fibers[i];
    g_current = (unsigned)i;
    threadIdx = f.tid;
    blockIdx = f.bid;
    g_emu_smem_ptr = g_emu_smem[f.slot].data();
    if (!_setjmp(g_sched_jb)) {
      if (!f.started) {
        f.started = true;
        swapcontext(&g_sched_ctx, &f.ctx);  // the fiber leaves with _longjmp
      } else {
        _longjmp(f.jb, 1);
      }
    }
  };
  for (bool running = true; running;) {
    running = false;
    for (size_t b = 0; b < blocks.size(); ++b) {
      for (bool moved = true; moved;) {
        const unsigned long long before = g_progress;
        bool live = false;
        for (size_t i = b * threads; i < (b + 1) * threads; ++i) {
          if (g_fibers[i].done) continue;
          live = true;
          resume(i);
        }
        running |= live;
        moved = live && g_progress != before;
      }
    }
  }
}

// Run kernel(args) over the grid, one block at a time (as an ordinary launch may).
template <class Args>
void emu_launch(void (*kernel)(const Args), EmuDim grid, EmuDim block, size_t smem_bytes, const Args& args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads != 256) std::abort();  // the only block size of the kernels (8 warps)
  blockDim = block;
  gridDim = grid;
  g_job = [&] { kernel(args); };
  const unsigned n = grid.x * grid.y * grid.z;
  for (unsigned lin = 0; lin < n; ++lin) emu_run_blocks({lin}, grid, block, smem_bytes);
}

// A cooperative launch: every block of the grid resident at once.
template <class Args>
void emu_launch_cooperative(void (*kernel)(const Args), EmuDim grid, EmuDim block, size_t smem_bytes,
                            const Args& args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads != 256) std::abort();
  blockDim = block;
  gridDim = grid;
  g_job = [&] { kernel(args); };
  std::vector<unsigned> all(grid.x * grid.y * grid.z);
  for (unsigned i = 0; i < all.size(); ++i) all[i] = i;
  emu_run_blocks(all, grid, block, smem_bytes);
}
