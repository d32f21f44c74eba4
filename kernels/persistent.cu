// Persistent ("on-chip") training forward and backward: each thread loads its share of a
// channel (channels-first) or channel tile (channels-last) once, keeps it in registers and
// dynamic shared memory, reduces it, and writes the elementwise result from there. x (and
// dy) is read from memory once: forward 2 passes (read x, write y), backward 3 (read x and
// dy, write dx), against 3 and 5 for the reduction + elementwise kernels.
//
// Two launch modes (host: src/cuda/launch.rs, plan_persistent):
//   splits == 1 (gridDim.y == 1): a block owns whole channels (tiles), one after another;
//     an ordinary launch, no grid-wide synchronization.
//   splits > 1: a block owns exactly one (channel or tile, split) item (gridDim.x == C or
//     the tile count, checked: a trap rather than a hang). Partial results go through the
//     workspace across one grid-wide barrier (grid_barrier), so the host launches it
//     cooperatively (cuLaunchCooperativeKernel: every block resident, or the launch fails).
//     Every block of a channel then merges all its partials in the same order and derives
//     the same statistics; only split 0 writes saved / running statistics (or dweight,
//     dbias).
//
// Statistics: per thread two passes over its stored values (sum of x - pivot, then sum of
// squared deviations: no Welford needed, the values are on chip), f32 over chunks of at
// most 64 values folded into f64, then Chan's merge over warps, the block and the splits,
// as the other kernels. Backward sums likewise (g * (x - mean_hi), the f64 correction in
// finalize_grad).
//
// Storage per thread and stored tensor: slots of V floats, the first R = REG / V in
// registers (compile-time indexed, fully unrolled), the next a.slots in dynamic shared
// memory at store[((slot - R) * V + v) * 256 + tid] (conflict-free). Only dynamic shared
// memory, no static __shared__: kernels/emu runs a cooperative grid's blocks side by side.
//
// Entry points: bn_fwd_persist_{nchw,nhwc}_{f32,f16,bf16}, bn_bwd_persist_{...}; 32-bit
// indices only (the tensors that qualify are small). Dynamic shared memory (floats):
//   nchw: BN_PERSIST_SCRATCH_CF + T * a.slots * V * 256
//   nhwc: 3 * V * 256 + 4 * bdx * V + T * a.slots * V * 256      (T = 1 forward, 2 backward)
#include "elementwise.cuh"

// Floats of each stored tensor kept in registers per thread (mirrored in src/cuda/launch.rs):
// forward channels-first, forward channels-last (V channels of per-channel state besides),
// backward (x and g each).
#define BN_PERSIST_REG_FWD 32
#define BN_PERSIST_REG_FWD_CL 16
#define BN_PERSIST_REG_BWD 16
// Floats of dynamic shared memory before the storage, channels-first (warp partials, map).
#define BN_PERSIST_SCRATCH_CF 64
// Shared-memory slots loaded per batch (loads in flight before the stores to shared memory).
#define BN_PERSIST_SMEM_BATCH 4

// ---------------------------------------------------------------- grid-wide barrier
// For a cooperative launch (every block resident). Block (0, 0) adds 2^31 - (blocks - 1),
// every other block 1: once all have arrived, bit 31 of the counter has flipped, and the
// low 31 bits are back where they were, so the counter needs no reset between barriers or
// launches (it starts at 0 with the workspace and no other kernel uses it). The fences
// before and after make the block's writes visible to, and the other blocks' writes
// visible after, the barrier (thread 0 fences after the block barrier: cumulative).
__device__ __forceinline__ void grid_barrier(u32* counter, u32 blocks) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const bool master = blockIdx.x == 0 && blockIdx.y == 0;
    const u32 inc = master ? 0x80000000u - (blocks - 1u) : 1u;
    __threadfence();
    const u32 old = atomicAdd(counter, inc);
    while (((old ^ ld_volatile(counter)) & 0x80000000u) == 0u) bn_pause();
    __threadfence();
  }
  __syncthreads();
}

// ---------------------------------------------------------------- per-thread storage
template <int V, int REG>
struct Stash {
  static constexpr int R = REG / V > 0 ? REG / V : 1;
  float r[R][V];
  float* sm;  // this tensor's shared-memory slots
  u32 tid;
  __device__ __forceinline__ float& at(u32 k, int v) const { return sm[((k - (u32)R) * V + (u32)v) * BN_THREADS + tid]; }
};

// Fill slots [0, nk) of st from src(k) (a pointer to V elements): the register slots with
// all loads in flight, then the shared-memory slots in batches.
template <class E, int V, int REG, class Src>
__device__ __forceinline__ void stash_load(Stash<V, REG>& st, u32 nk, Src src) {
  constexpr int R = Stash<V, REG>::R;
#pragma unroll
  for (int k = 0; k < R; ++k)
    if ((u32)k < nk) IO<E, V>::load(src((u32)k), st.r[k]);
  constexpr int B = BN_PERSIST_SMEM_BATCH;
  for (u32 k = R; k < nk; k += B) {
    float t[B][V];
#pragma unroll
    for (int b = 0; b < B; ++b)
      if (k + b < nk) IO<E, V>::load(src(k + b), t[b]);
#pragma unroll
    for (int b = 0; b < B; ++b)
      if (k + b < nk) {
#pragma unroll
        for (int v = 0; v < V; ++v) st.at(k + b, v) = t[b][v];
      }
  }
}

// f(k, vals) for every stored slot, in order (read-only); flush() after the register slots
// and after every BN_PERSIST_CHUNK values of shared-memory slots (and at the end), so f32
// partial sums stay short and fold into f64 totals (the error does not grow with the
// number of values a thread holds).
#define BN_PERSIST_CHUNK 64
template <int V, int REG, class F, class Flush>
__device__ __forceinline__ void stash_each(const Stash<V, REG>& st, u32 nk, F f, Flush flush) {
  constexpr int R = Stash<V, REG>::R;
  constexpr u32 CH = BN_PERSIST_CHUNK / V > 0 ? BN_PERSIST_CHUNK / V : 1;
#pragma unroll
  for (int k = 0; k < R; ++k)
    if ((u32)k < nk) f((u32)k, st.r[k]);
  flush();
  for (u32 k0 = R; k0 < nk; k0 += CH) {
    const u32 k1 = k0 + CH < nk ? k0 + CH : nk;
    for (u32 k = k0; k < k1; ++k) {
      float t[V];
#pragma unroll
      for (int v = 0; v < V; ++v) t[v] = st.at(k, v);
      f(k, t);
    }
    flush();
  }
}

template <int V, int REG, class F>
__device__ __forceinline__ void stash_each(const Stash<V, REG>& st, u32 nk, F f) {
  stash_each(st, nk, f, [] {});
}

// Moments of the stored values, shifted by pivot[lane]: lane v of every slot belongs to
// channel lane v (PER_LANE, channels-last) or all to one channel (lane 0, channels-first).
// Two passes over the values on chip (mean, then squared deviations), f32 within a chunk,
// f64 across chunks.
template <int L, bool PER_LANE, int V, int REG>
__device__ __forceinline__ void stash_moments(const Stash<V, REG>& st, u32 nk, const float (&pivot)[L],
                                              Moments (&m)[L]) {
  float p[L];
  double t[L];
#pragma unroll
  for (int l = 0; l < L; ++l) p[l] = 0.f, t[l] = 0.0;
  auto flush = [&] {
#pragma unroll
    for (int l = 0; l < L; ++l) t[l] += (double)p[l], p[l] = 0.f;
  };
  stash_each(
      st, nk,
      [&](u32, const float (&x)[V]) {
#pragma unroll
        for (int v = 0; v < V; ++v) p[PER_LANE ? v : 0] += x[v] - pivot[PER_LANE ? v : 0];
      },
      flush);
  const double n = (double)(nk * (PER_LANE ? 1u : (u32)V));
  float mu[L];
#pragma unroll
  for (int l = 0; l < L; ++l) mu[l] = n > 0.0 ? (float)(t[l] / n) : 0.f, t[l] = 0.0;
  stash_each(
      st, nk,
      [&](u32, const float (&x)[V]) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int l = PER_LANE ? v : 0;
          const float d = (x[v] - pivot[l]) - mu[l];
          p[l] = fmaf(d, d, p[l]);
        }
      },
      flush);
#pragma unroll
  for (int l = 0; l < L; ++l) {
    m[l].n = (float)n;
    m[l].mean = mu[l];
    m[l].m2 = (float)t[l];
  }
}

// Backward sums of the stored g and x: sum g, sum g * (x - mean_hi[lane]); f32 within a
// chunk, f64 across chunks.
template <int L, bool PER_LANE, int V, int REG>
__device__ __forceinline__ void stash_sums(const Stash<V, REG>& sx, const Stash<V, REG>& sg, u32 nk,
                                           const float (&mean_hi)[L], Sums (&s)[L]) {
  constexpr int R = Stash<V, REG>::R;
  constexpr u32 CH = BN_PERSIST_CHUNK / V > 0 ? BN_PERSIST_CHUNK / V : 1;
  float pg[L], pgx[L];
  double tg[L], tgx[L];
#pragma unroll
  for (int l = 0; l < L; ++l) pg[l] = pgx[l] = 0.f, tg[l] = tgx[l] = 0.0;
  auto acc = [&](const float (&x)[V], const float (&g)[V]) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int l = PER_LANE ? v : 0;
      pg[l] += g[v];
      pgx[l] = fmaf(g[v], x[v] - mean_hi[l], pgx[l]);
    }
  };
  auto flush = [&] {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      tg[l] += (double)pg[l];
      tgx[l] += (double)pgx[l];
      pg[l] = pgx[l] = 0.f;
    }
  };
#pragma unroll
  for (int k = 0; k < R; ++k)
    if ((u32)k < nk) acc(sx.r[k], sg.r[k]);
  flush();
  for (u32 k0 = R; k0 < nk; k0 += CH) {
    const u32 k1 = k0 + CH < nk ? k0 + CH : nk;
    for (u32 k = k0; k < k1; ++k) {
      float x[V], g[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        x[v] = sx.at(k, v);
        g[v] = sg.at(k, v);
      }
      acc(x, g);
    }
    flush();
  }
#pragma unroll
  for (int l = 0; l < L; ++l) {
    s[l].g = (float)tg[l];
    s[l].gx = (float)tgx[l];
  }
}

// Store y of the slots: y = act((x - mean) * scale + shift [+ z]) at dst(k).
template <class E, bool PER_LANE, int V, int REG, int NM, class Dst>
__device__ __forceinline__ void stash_normalize(const BnArgs& a, const Stash<V, REG>& st, u32 nk,
                                                const NormMap (&m)[NM], Dst dst) {
  typedef typename E::T T;
  const Fusion f(a.flags);
  stash_each(st, nk, [&](u32 k, const float (&x)[V]) {
    const u64 o = dst(k);
    float z[V], y[V];
    if (f.add) IO<E, V>::load((const T*)a.z + o, z);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const NormMap& q = m[PER_LANE ? v : 0];
      y[v] = norm_of(f, x[v], f.add ? z[v] : 0.f, q.mean, q.scale, q.shift);
    }
    IO<E, V>::store((T*)a.y + o, y);
  });
}

// Store dx (and dz) of the slots: dx = a * ((g - gmean) + k * (x - mean)), dz = g.
template <class E, bool PER_LANE, int V, int REG, int NM, class Dst>
__device__ __forceinline__ void stash_dx(const BnArgs& a, const Stash<V, REG>& sx, const Stash<V, REG>& sg, u32 nk,
                                         const GradMap (&m)[NM], Dst dst) {
  typedef typename E::T T;
  constexpr int R = Stash<V, REG>::R;
  const bool dz = a.dz != nullptr;
  auto out = [&](u32 k, const float (&x)[V], const float (&g)[V]) {
    const u64 o = dst(k);
    float d[V];
#pragma unroll
    for (int v = 0; v < V; ++v) d[v] = dx_of(m[PER_LANE ? v : 0], g[v], x[v]);
    IO<E, V>::store((T*)a.dx + o, d);
    if (dz) IO<E, V>::store((T*)a.dz + o, g);
  };
#pragma unroll
  for (int k = 0; k < R; ++k)
    if ((u32)k < nk) out((u32)k, sx.r[k], sg.r[k]);
  for (u32 k = R; k < nk; ++k) {
    float x[V], g[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      x[v] = sx.at(k, v);
      g[v] = sg.at(k, v);
    }
    out(k, x, g);
  }
}

// Load x and g = dy (gated by y > 0 with a fused ReLU) of the slots into two stashes.
template <class E, int V, int REG, class Src>
__device__ __forceinline__ void stash_load_grad(const BnArgs& a, Stash<V, REG>& sx, Stash<V, REG>& sg, u32 nk,
                                                Src src) {
  typedef typename E::T T;
  const bool relu = (a.flags & BN_F_RELU) != 0;
  stash_load<E>(sx, nk, [&](u32 k) { return (const T*)a.x + src(k); });
  stash_load<E>(sg, nk, [&](u32 k) { return (const T*)a.dy + src(k); });
  if (!relu) return;
  // Gate in place: g = 0 where y <= 0 (a NaN y passes dy, as everywhere).
  constexpr int R = Stash<V, REG>::R;
#pragma unroll
  for (int k = 0; k < R; ++k)
    if ((u32)k < nk) {
      float y[V];
      IO<E, V>::load((const T*)a.y + src((u32)k), y);
#pragma unroll
      for (int v = 0; v < V; ++v) sg.r[k][v] = grad_of(true, sg.r[k][v], y[v]);
    }
  for (u32 k = R; k < nk; ++k) {
    float y[V];
    IO<E, V>::load((const T*)a.y + src(k), y);
#pragma unroll
    for (int v = 0; v < V; ++v) sg.at(k, v) = grad_of(true, sg.at(k, v), y[v]);
  }
}

// ---------------------------------------------------------------- channels-first
// Block (c, split): vectors i = split * 256 + tid + k * splits * 256 of channel c.
struct CfItem {
  u32 i0, stride, nk;
  __device__ __forceinline__ CfItem(u32 mv) {
    stride = gridDim.y * BN_THREADS;
    i0 = blockIdx.y * BN_THREADS + threadIdx.x;
    nk = i0 < mv ? (mv - i0 - 1u) / stride + 1u : 0u;
  }
};

template <class E, int V>
__device__ __forceinline__ void fwd_persist_nchw(const BnArgs& a) {
  typedef typename E::T T;
  BN_DYNAMIC_SMEM(sm);
  Moments* sm_warp = reinterpret_cast<Moments*>(sm);  // BN_WARPS moments
  float* sm_map = sm + 3 * BN_WARPS;                  // mean, scale, shift
  Stash<V, BN_PERSIST_REG_FWD> st;
  st.sm = sm + BN_PERSIST_SCRATCH_CF;
  st.tid = threadIdx.x;

  const T* x = (const T*)a.x;
  const u32 C = (u32)a.c, S = (u32)a.s, MV = (u32)a.n * (S / (u32)V), gap = (C - 1u) * S;
  const u32 splits = gridDim.y, split = blockIdx.y;
  const CfItem it(MV);
  if (splits > 1 && gridDim.x != C) __trap();  // the grid barrier needs one channel per block

  for (u32 c = blockIdx.x; c < C; c += gridDim.x) {
    auto off = [&](u32 k) -> u64 { return (u64)cf_offset<u32, V>(a, c, it.i0 + k * it.stride, S, gap); };
    stash_load<E>(st, it.nk, [&](u32 k) { return x + off(k); });
    const float pivot[1] = {E::to_f32(__ldg(x + (u64)c * S))};
    Moments m[1];
    stash_moments<1, false>(st, it.nk, pivot, m);
    Moments mb = block_merge(m[0], sm_warp);
    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (threadIdx.x == 0) put(a.partials, total, (u64)c * splits + split, mb);
      grid_barrier(a.counters, gridDim.x * gridDim.y);
      mb = fold_partials<Moments, 1>(a.partials, total, (u64)c * splits, 1, (u32)threadIdx.x, splits, (u32)BN_THREADS);
      mb = block_merge(mb, sm_warp);
    }
    if (threadIdx.x == 0) {
      float mean, scale, shift;
      finalize_stats(a, c, mb, pivot[0], mean, scale, shift, split == 0);
      sm_map[0] = mean;
      sm_map[1] = scale;
      sm_map[2] = shift;
    }
    __syncthreads();
    NormMap map[1];
    map[0].mean = sm_map[0];
    map[0].scale = sm_map[1];
    map[0].shift = sm_map[2];
    stash_normalize<E, false>(a, st, it.nk, map, off);
    __syncthreads();  // sm_map and the storage are reused by the next channel
  }
}

template <class E, int V>
__device__ __forceinline__ void bwd_persist_nchw(const BnArgs& a) {
  BN_DYNAMIC_SMEM(sm);
  Sums* sm_warp = reinterpret_cast<Sums*>(sm);  // BN_WARPS sums
  float* sm_map = sm + 2 * BN_WARPS;            // mean, a, gmean, k
  typedef Stash<V, BN_PERSIST_REG_BWD> St;
  St sx, sg;
  sx.sm = sm + BN_PERSIST_SCRATCH_CF;
  sg.sm = sx.sm + a.slots * V * BN_THREADS;
  sx.tid = sg.tid = threadIdx.x;

  const u32 C = (u32)a.c, S = (u32)a.s, MV = (u32)a.n * (S / (u32)V), gap = (C - 1u) * S;
  const u32 splits = gridDim.y, split = blockIdx.y;
  const CfItem it(MV);
  if (splits > 1 && gridDim.x != C) __trap();

  for (u32 c = blockIdx.x; c < C; c += gridDim.x) {
    auto off = [&](u32 k) -> u64 { return (u64)cf_offset<u32, V>(a, c, it.i0 + k * it.stride, S, gap); };
    stash_load_grad<E>(a, sx, sg, it.nk, off);
    const float mean_c = channel_mean(a, c);
    const float mean_hi[1] = {mean_on_grid<E>(mean_c)};
    Sums s[1];
    stash_sums<1, false>(sx, sg, it.nk, mean_hi, s);
    Sums sb = block_merge(s[0], sm_warp);
    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (threadIdx.x == 0) put(a.partials, total, (u64)c * splits + split, sb);
      grid_barrier(a.counters, gridDim.x * gridDim.y);
      sb = fold_partials<Sums, 1>(a.partials, total, (u64)c * splits, 1, (u32)threadIdx.x, splits, (u32)BN_THREADS);
      sb = block_merge(sb, sm_warp);
    }
    if (threadIdx.x == 0) {
      const GradMap g = finalize_grad(a, c, sb, mean_c, mean_hi[0], split == 0);
      sm_map[0] = g.mean;
      sm_map[1] = g.a;
      sm_map[2] = g.gmean;
      sm_map[3] = g.k;
    }
    __syncthreads();
    GradMap map[1];
    map[0].mean = sm_map[0];
    map[0].a = sm_map[1];
    map[0].gmean = sm_map[2];
    map[0].k = sm_map[3];
    stash_dx<E, false>(a, sx, sg, it.nk, map, off);
    __syncthreads();
  }
}

// ---------------------------------------------------------------- channels-last
// Block (tile, split), thread (tx, ty): channels [ch0, ch0 + V), rows
// r = split * bdy + ty + k * splits * bdy.
struct ClItem {
  u32 r0, rstride, nk;
  __device__ __forceinline__ ClItem(const Tile2D& t, u32 rows) {
    rstride = gridDim.y * t.bdy;
    r0 = blockIdx.y * t.bdy + t.ty;
    nk = r0 < rows ? (rows - r0 - 1u) / rstride + 1u : 0u;
  }
};

template <int V>
__device__ __forceinline__ u32 persist_scratch_cl(const Tile2D& t) {
  return 3u * V * BN_THREADS + 4u * t.bdx * V;
}

template <class E, int V>
__device__ __forceinline__ void fwd_persist_nhwc(const BnArgs& a) {
  typedef typename E::T T;
  BN_DYNAMIC_SMEM(sm);  // [3][V][bdy][bdx] moments, [3][bdx * V] maps, then the storage
  const Tile2D t;
  float* sp = sm + 3 * V * BN_THREADS;
  Stash<V, BN_PERSIST_REG_FWD_CL> st;
  st.sm = sm + persist_scratch_cl<V>(t);
  st.tid = t.tid;

  const T* x = (const T*)a.x;
  const u32 C = (u32)a.c, R = (u32)(a.n * a.s);
  const u32 lanes = t.bdx * V, tiles = (C + lanes - 1u) / lanes;
  const u32 splits = gridDim.y, split = blockIdx.y;
  const ClItem it(t, R);
  if (splits > 1 && gridDim.x != tiles) __trap();

  for (u32 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const u32 ch0 = tile * lanes + t.tx * V;
    const bool active = ch0 < C;
    const u32 nk = active ? it.nk : 0u;
    auto off = [&](u32 k) -> u64 { return (u64)(it.r0 + k * it.rstride) * C + ch0; };
    stash_load<E>(st, nk, [&](u32 k) { return x + off(k); });
    float pivot[V];
    Moments m[V];
    if (active) {
      IO<E, V>::load(x + ch0, pivot);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) pivot[v] = 0.f;
    }
    stash_moments<V, true>(st, nk, pivot, m);
    column_merge<V>(m, sm, t);
    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (t.ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) put(a.partials, total, (u64)split * C + ch0 + v, m[v]);
      }
      grid_barrier(a.counters, gridDim.x * gridDim.y);
#pragma unroll
      for (int v = 0; v < V; ++v)
        m[v] = active ? fold_partials<Moments, 1>(a.partials, total, (u64)ch0 + v, C, (u32)t.ty, splits, (u32)t.bdy) : mo_empty();
      column_merge<V>(m, sm, t);
    }
    if (t.ty == 0 && active) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float mean, scale, shift;
        finalize_stats(a, ch0 + v, m[v], pivot[v], mean, scale, shift, split == 0);
        const u32 j = t.tx * V + v;
        sp[j] = mean;
        sp[lanes + j] = scale;
        sp[2 * lanes + j] = shift;
      }
    }
    __syncthreads();
    if (active) {
      NormMap map[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const u32 j = t.tx * V + v;
        map[v].mean = sp[j];
        map[v].scale = sp[lanes + j];
        map[v].shift = sp[2 * lanes + j];
      }
      stash_normalize<E, true>(a, st, nk, map, off);
    }
    __syncthreads();  // shared memory is reused by the next tile
  }
}

template <class E, int V>
__device__ __forceinline__ void bwd_persist_nhwc(const BnArgs& a) {
  BN_DYNAMIC_SMEM(sm);  // [2][V][bdy][bdx] sums, [4][bdx * V] maps (within the 3 * V * 256 + 4 * bdx * V scratch)
  const Tile2D t;
  float* sp = sm + 3 * V * BN_THREADS;
  typedef Stash<V, BN_PERSIST_REG_BWD> St;
  St sx, sg;
  sx.sm = sm + persist_scratch_cl<V>(t);
  sg.sm = sx.sm + a.slots * V * BN_THREADS;
  sx.tid = sg.tid = t.tid;

  const u32 C = (u32)a.c, R = (u32)(a.n * a.s);
  const u32 lanes = t.bdx * V, tiles = (C + lanes - 1u) / lanes;
  const u32 splits = gridDim.y, split = blockIdx.y;
  const ClItem it(t, R);
  if (splits > 1 && gridDim.x != tiles) __trap();

  for (u32 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const u32 ch0 = tile * lanes + t.tx * V;
    const bool active = ch0 < C;
    const u32 nk = active ? it.nk : 0u;
    auto off = [&](u32 k) -> u64 { return (u64)(it.r0 + k * it.rstride) * C + ch0; };
    stash_load_grad<E>(a, sx, sg, nk, off);
    float mean[V], mean_hi[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      mean[v] = active ? channel_mean(a, (u64)ch0 + v) : 0.f;
      mean_hi[v] = mean_on_grid<E>(mean[v]);
    }
    Sums s[V];
    stash_sums<V, true>(sx, sg, nk, mean_hi, s);
    column_sum<V>(s, sm, t);
    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (t.ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) put(a.partials, total, (u64)split * C + ch0 + v, s[v]);
      }
      grid_barrier(a.counters, gridDim.x * gridDim.y);
#pragma unroll
      for (int v = 0; v < V; ++v)
        s[v] = active ? fold_partials<Sums, 1>(a.partials, total, (u64)ch0 + v, C, (u32)t.ty, splits, (u32)t.bdy) : sums_zero();
      column_sum<V>(s, sm, t);
    }
    if (t.ty == 0 && active) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const GradMap g = finalize_grad(a, (u64)ch0 + v, s[v], mean[v], mean_hi[v], split == 0);
        const u32 j = t.tx * V + v;
        sp[j] = g.mean;
        sp[lanes + j] = g.a;
        sp[2 * lanes + j] = g.gmean;
        sp[3 * lanes + j] = g.k;
      }
    }
    __syncthreads();
    if (active) {
      GradMap map[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const u32 j = t.tx * V + v;
        map[v].mean = sp[j];
        map[v].a = sp[lanes + j];
        map[v].gmean = sp[2 * lanes + j];
        map[v].k = sp[3 * lanes + j];
      }
      stash_dx<E, true>(a, sx, sg, nk, map, off);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- entry points
template <class E>
__device__ __forceinline__ void fwd_persist_nchw_any(const BnArgs& a) {
  if (a.flags & BN_F_VEC) fwd_persist_nchw<E, VecCF<E>::value>(a);
  else fwd_persist_nchw<E, 1>(a);
}
template <class E>
__device__ __forceinline__ void fwd_persist_nhwc_any(const BnArgs& a) {
  if (a.flags & BN_F_VEC) fwd_persist_nhwc<E, BN_VEC_CL>(a);
  else fwd_persist_nhwc<E, 1>(a);
}
template <class E>
__device__ __forceinline__ void bwd_persist_nchw_any(const BnArgs& a) {
  if (a.flags & BN_F_VEC) bwd_persist_nchw<E, VecCF<E>::value>(a);
  else bwd_persist_nchw<E, 1>(a);
}
template <class E>
__device__ __forceinline__ void bwd_persist_nhwc_any(const BnArgs& a) {
  if (a.flags & BN_F_VEC) bwd_persist_nhwc<E, BN_VEC_CL>(a);
  else bwd_persist_nhwc<E, 1>(a);
}

// Two blocks of 256 per SM (<= 128 registers): the register storage plus the usual state.
#define BN_PERSIST_KERNEL extern "C" __global__ void __launch_bounds__(BN_THREADS, 2)
#define BN_PERSIST(tag, E)                                                                        \
  BN_PERSIST_KERNEL bn_fwd_persist_nchw_##tag(const BnArgs a) { fwd_persist_nchw_any<E>(a); }      \
  BN_PERSIST_KERNEL bn_fwd_persist_nhwc_##tag(const BnArgs a) { fwd_persist_nhwc_any<E>(a); }      \
  BN_PERSIST_KERNEL bn_bwd_persist_nchw_##tag(const BnArgs a) { bwd_persist_nchw_any<E>(a); }      \
  BN_PERSIST_KERNEL bn_bwd_persist_nhwc_##tag(const BnArgs a) { bwd_persist_nhwc_any<E>(a); }

BN_PERSIST(f32, F32)
BN_PERSIST(f16, F16)
BN_PERSIST(bf16, BF16)
