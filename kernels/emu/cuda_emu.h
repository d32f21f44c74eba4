// A tiny host emulation of the CUDA features the bnorm kernels use, so the real kernel
// sources (kernels/*.cu) compile with g++ and run on the CPU: every CUDA thread of a block
// is a fiber (ucontext), __syncthreads is a block barrier, warp shuffles go through a
// per-warp buffer and barrier, and blocks run one after another (so `static` serves as
// __shared__, and the last-block handshake sees every other block's partials, as on a
// GPU). Fibers switch only at barriers: deterministic, and fast on any core count.
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
#include <functional>
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

// Dynamic shared memory: one buffer, refilled with NaN before every block.
inline std::vector<float> g_emu_smem;
#define BN_DYNAMIC_SMEM(name) float* name = g_emu_smem.data()

// ---------------------------------------------------------------- fibers
// A fiber is entered once through makecontext/swapcontext; after that fibers and the
// scheduler switch with _setjmp/_longjmp, which (unlike swapcontext) make no system call.
// Build without _FORTIFY_SOURCE (its longjmp check rejects jumps between stacks).
struct EmuFiber {
  ucontext_t ctx;
  jmp_buf jb;
  std::vector<char> stack;
  bool started = false, done = false;
};
struct EmuBarrier {
  unsigned n = 0, arrived = 0, generation = 0;
};
inline std::vector<EmuFiber> g_fibers;
inline ucontext_t g_sched_ctx;
inline jmp_buf g_sched_jb;
inline unsigned g_current = 0;
inline std::function<void()> g_job;
inline EmuBarrier g_block_barrier;
inline std::vector<EmuBarrier> g_warp_barriers;
inline float g_warp_vals[8][32];

inline void emu_yield() {
  if (!_setjmp(g_fibers[g_current].jb)) _longjmp(g_sched_jb, 1);
}

inline void emu_wait(EmuBarrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) emu_yield();
}

inline unsigned emu_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }

inline void __syncthreads() { emu_wait(g_block_barrier); }
inline void __threadfence() {}

inline float __shfl_down_sync(unsigned, float v, int off) {
  const unsigned tid = emu_tid(), warp = tid / 32, lane = tid % 32;
  g_warp_vals[warp][lane] = v;
  emu_wait(g_warp_barriers[warp]);
  const float r = lane + off < 32 ? g_warp_vals[warp][lane + off] : v;
  emu_wait(g_warp_barriers[warp]);
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
  _longjmp(g_sched_jb, 1);  // never returns
}

// Run kernel(args) over the grid, one block at a time; a block's threads are fibers that
// the scheduler resumes round-robin, each running until it waits at a barrier or ends.
template <class Args>
void emu_launch(void (*kernel)(const Args), EmuDim grid, EmuDim block, size_t smem_bytes, const Args& args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads != 256) std::abort();  // the only block size of the kernels (8 warps)
  blockDim = block;
  gridDim = grid;
  g_job = [&] { kernel(args); };
  g_fibers.resize(threads);
  g_warp_barriers.assign(threads / 32, EmuBarrier{32, 0, 0});
  for (auto& f : g_fibers)
    if (f.stack.empty()) f.stack.resize(256 * 1024);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_emu_smem.assign(smem_bytes / 4 + 1, std::nanf(""));
        g_block_barrier = EmuBarrier{threads, 0, 0};
        blockIdx = EmuDim{bx, by, bz};
        for (auto& f : g_fibers) {
          f.done = false;
          f.started = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, emu_fiber_main, 0);
        }
        for (bool running = true; running;) {
          running = false;
          for (unsigned t = 0; t < threads; ++t) {
            if (g_fibers[t].done) continue;
            running = true;
            g_current = t;
            threadIdx = EmuDim{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            EmuFiber& f = g_fibers[t];
            if (!_setjmp(g_sched_jb)) {
              if (!f.started) {
                f.started = true;
                swapcontext(&g_sched_ctx, &f.ctx);  // the fiber leaves with _longjmp
              } else {
                _longjmp(f.jb, 1);
              }
            }
          }
        }
      }
}
