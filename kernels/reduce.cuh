// Reductions: Welford accumulators, Chan's pairwise merge, plain (g, g*x) sums; their
// warp-shuffle, block and cross-block (last-block) combination; and the per-channel
// finalize steps of the forward statistics and of the backward reduction.
//
// Accuracy: a thread keeps K = U * V accumulators that advance in lockstep over at most
// ~256 values each (the host sizes the split so), and every combination after that is a
// pairwise Chan merge (or a pairwise sum), so the f32 rounding error does not grow with M.
// Forward statistics are taken of x - pivot, pivot = the channel's first element: the
// shift is exact for data clustered around a large offset (x = 1e4 + N(0, 1)), where plain
// f32 Welford would lose ~10 bits of the deviations. Per-channel finalize math is f64.
#pragma once
#include "common.cuh"

#define BN_FULL_MASK 0xffffffffu

// ---------------------------------------------------------------- Welford / Chan
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments mo_empty() {
  Moments m;
  m.n = 0.f;
  m.mean = 0.f;
  m.m2 = 0.f;
  return m;
}

// Chan et al.: moments of the union of two disjoint sets. Empty sets (n == 0, mean == 0,
// m2 == 0) are neutral on either side.
__device__ __forceinline__ Moments chan(const Moments& a, const Moments& b) {
  Moments r;
  r.n = a.n + b.n;
  const float wb = r.n > 0.f ? b.n / r.n : 0.f;
  const float d = b.mean - a.mean;
  r.mean = fmaf(d, wb, a.mean);
  r.m2 = a.m2 + b.m2 + d * d * a.n * wb;
  return r;
}

// K = U * V Welford accumulators. Full groups (U vectors of V) advance all K in lockstep:
// one count and one reciprocal per step. Leftover single vectors go to lanes [0, V) only,
// which then carry their own count n0 (no separate tail accumulators: fewer registers).
template <int V, int U>
struct Lanes {
  static constexpr int K = U * V;
  float mean[K], m2[K];
  float n, n0;  // count of every lane; of lanes [0, V) (n0 >= n)
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      mean[k] = 0.f;
      m2[k] = 0.f;
    }
    n = 0.f;
    n0 = 0.f;
  }
  template <int L>
  __device__ __forceinline__ void step(const float (&x)[L], float r) {
#pragma unroll
    for (int k = 0; k < L; ++k) {
      const float d = x[k] - mean[k];
      mean[k] = fmaf(d, r, mean[k]);
      m2[k] = fmaf(d, x[k] - mean[k], m2[k]);
    }
  }
  // A full group; only before any push_first.
  __device__ __forceinline__ void push(const float (&x)[K]) {
    n += 1.f;
    n0 = n;
    step<K>(x, __frcp_rn(n));
  }
  // One leftover vector, into lanes [0, V).
  __device__ __forceinline__ void push_first(const float (&x)[V]) {
    n0 += 1.f;
    step<V>(x, __frcp_rn(n0));
  }
  __device__ __forceinline__ Moments lane(int k) const {
    Moments m;
    m.n = k < V ? n0 : n;
    m.mean = mean[k];
    m.m2 = m2[k];
    return m;
  }
};

// Lane v of the result: pairwise merge of acc lanes u * V + v (u < U).
template <int V, int U>
__device__ __forceinline__ void fold_lanes(const Lanes<V, U>& acc, Moments (&out)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    Moments t[U];
#pragma unroll
    for (int u = 0; u < U; ++u) t[u] = acc.lane(u * V + v);
#pragma unroll
    for (int w = U / 2; w > 0; w /= 2) {
#pragma unroll
      for (int u = 0; u < w; ++u) t[u] = chan(t[u], t[u + w]);
    }
    out[v] = t[0];
  }
}

// Pairwise merge of V moments of one channel.
template <int V>
__device__ __forceinline__ Moments fold_all(Moments (&m)[V]) {
#pragma unroll
  for (int w = V / 2; w > 0; w /= 2) {
#pragma unroll
    for (int v = 0; v < w; ++v) m[v] = chan(m[v], m[v + w]);
  }
  return m[0];
}

__device__ __forceinline__ Moments shfl_down(const Moments& m, int off) {
  Moments r;
  r.n = __shfl_down_sync(BN_FULL_MASK, m.n, off);
  r.mean = __shfl_down_sync(BN_FULL_MASK, m.mean, off);
  r.m2 = __shfl_down_sync(BN_FULL_MASK, m.m2, off);
  return r;
}

// Tree over the warp; lane 0 ends with the whole warp's moments (fixed order: deterministic).
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = chan(m, shfl_down(m, off));
  return m;
}

// Whole 1-D block (BN_THREADS threads); thread 0 ends with the result. Ends with a barrier,
// so `sm` may be reused right after.
__device__ __forceinline__ Moments block_merge(Moments m, Moments* sm) {
  const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  m = warp_merge(m);
  if (lane == 0) sm[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < BN_WARPS ? sm[lane] : mo_empty();
    m = warp_merge(m);
  }
  __syncthreads();
  return m;
}

// ---------------------------------------------------------------- sums of the backward pass
struct Sums {
  float g, gx;  // sum g, sum g * (x - mean_hi) (mean_on_grid)
};

__device__ __forceinline__ Sums sums_zero() {
  Sums s;
  s.g = 0.f;
  s.gx = 0.f;
  return s;
}

__device__ __forceinline__ Sums add(const Sums& a, const Sums& b) {
  Sums r;
  r.g = a.g + b.g;
  r.gx = a.gx + b.gx;
  return r;
}

template <int K>
struct SumLanes {
  float g[K], gx[K];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      g[k] = 0.f;
      gx[k] = 0.f;
    }
  }
  __device__ __forceinline__ Sums lane(int k) const {
    Sums s;
    s.g = g[k];
    s.gx = gx[k];
    return s;
  }
};

template <int V, int U>
__device__ __forceinline__ void fold_sums(const SumLanes<U * V>& acc, Sums (&out)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    Sums t[U];
#pragma unroll
    for (int u = 0; u < U; ++u) t[u] = acc.lane(u * V + v);
#pragma unroll
    for (int w = U / 2; w > 0; w /= 2) {
#pragma unroll
      for (int u = 0; u < w; ++u) t[u] = add(t[u], t[u + w]);
    }
    out[v] = t[0];
  }
}

template <int V>
__device__ __forceinline__ Sums fold_all(Sums (&m)[V]) {
#pragma unroll
  for (int w = V / 2; w > 0; w /= 2) {
#pragma unroll
    for (int v = 0; v < w; ++v) m[v] = add(m[v], m[v + w]);
  }
  return m[0];
}

__device__ __forceinline__ Sums warp_merge(Sums s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s.g += __shfl_down_sync(BN_FULL_MASK, s.g, off);
    s.gx += __shfl_down_sync(BN_FULL_MASK, s.gx, off);
  }
  return s;
}

__device__ __forceinline__ Sums block_merge(Sums s, Sums* sm) {
  const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  s = warp_merge(s);
  if (lane == 0) sm[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < BN_WARPS ? sm[lane] : sums_zero();
    s = warp_merge(s);
  }
  __syncthreads();
  return s;
}

// ---------------------------------------------------------------- channels-last column merges
// Merge the V moments of each thread over the bdy threads of its column (same channels),
// through shared memory arranged [field][V][bdy][bdx] (conflict-free over tx). Thread
// rows ty == 0 end with the block's result. Ends with a barrier.
template <int V>
__device__ __forceinline__ void column_merge(Moments (&m)[V], float* sm, const Tile2D& t) {
  const u32 plane = V * BN_THREADS;
  auto at = [&](int v, u32 row) { return ((u32)v * t.bdy + row) * t.bdx + t.tx; };
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const u32 j = at(v, t.ty);
    sm[j] = m[v].n;
    sm[plane + j] = m[v].mean;
    sm[2 * plane + j] = m[v].m2;
  }
  __syncthreads();
  for (u32 h = t.bdy / 2; h > 0; h >>= 1) {
    if (t.ty < h) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const u32 o = at(v, t.ty + h), j = at(v, t.ty);
        Moments b;
        b.n = sm[o];
        b.mean = sm[plane + o];
        b.m2 = sm[2 * plane + o];
        m[v] = chan(m[v], b);
        sm[j] = m[v].n;
        sm[plane + j] = m[v].mean;
        sm[2 * plane + j] = m[v].m2;
      }
    }
    __syncthreads();
  }
}

// As column_merge, for sums: [field][V][bdy][bdx].
template <int V>
__device__ __forceinline__ void column_sum(Sums (&s)[V], float* sm, const Tile2D& t) {
  const u32 plane = V * BN_THREADS;
  auto at = [&](int v, u32 row) { return ((u32)v * t.bdy + row) * t.bdx + t.tx; };
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const u32 j = at(v, t.ty);
    sm[j] = s[v].g;
    sm[plane + j] = s[v].gx;
  }
  __syncthreads();
  for (u32 h = t.bdy / 2; h > 0; h >>= 1) {
    if (t.ty < h) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const u32 o = at(v, t.ty + h), j = at(v, t.ty);
        s[v].g += sm[o];
        s[v].gx += sm[plane + o];
        sm[j] = s[v].g;
        sm[plane + j] = s[v].gx;
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- partials in the workspace
// Partial results are stored structure-of-arrays: field f of slot i at partials[f * total + i].
__device__ __forceinline__ void put(float* p, u64 total, u64 i, const Moments& m) {
  p[i] = m.n;
  p[total + i] = m.mean;
  p[2 * total + i] = m.m2;
}
__device__ __forceinline__ void put(float* p, u64 total, u64 i, const Sums& s) {
  p[i] = s.g;
  p[total + i] = s.gx;
}
// Reads bypass L1 (ld.global.cg): the slots were written by other blocks of this launch.
__device__ __forceinline__ Moments get_moments(const float* p, u64 total, u64 i) {
  Moments m;
  m.n = __ldcg(p + i);
  m.mean = __ldcg(p + total + i);
  m.m2 = __ldcg(p + 2 * total + i);
  return m;
}
__device__ __forceinline__ Sums get_sums(const float* p, u64 total, u64 i) {
  Sums s;
  s.g = __ldcg(p + i);
  s.gx = __ldcg(p + total + i);
  return s;
}

// The partials' monoids, for merging one slot of every split.
template <typename T>
struct Partial;
template <>
struct Partial<Moments> {
  static __device__ __forceinline__ Moments zero() { return mo_empty(); }
  static __device__ __forceinline__ Moments get(const float* p, u64 total, u64 i) { return get_moments(p, total, i); }
  static __device__ __forceinline__ Moments combine(const Moments& a, const Moments& b) { return chan(a, b); }
};
template <>
struct Partial<Sums> {
  static __device__ __forceinline__ Sums zero() { return sums_zero(); }
  static __device__ __forceinline__ Sums get(const float* p, u64 total, u64 i) { return get_sums(p, total, i); }
  static __device__ __forceinline__ Sums combine(const Sums& a, const Sums& b) { return add(a, b); }
};

// One thread's share of a cross-split merge: the slots base + k * step for k = first,
// first + stride, ... below splits, combined in increasing k (the caller then reduces
// across the threads that shared the splits).
//
// The slots are read BN_FOLD_BATCH at a time, all loads issued before the first combine:
// a channels-last tile's last block folds every split of its channels with bdy threads per
// channel (528 splits, 8 threads: 66 slots each on an H200), and one L2 round trip per
// slot left the rest of the GPU idle for tens of microseconds. Same order, same bits.
// The persistent kernels pass B = 1: their splits are co-resident blocks (a few per
// channel), and the batch's registers made two of them spill.
#define BN_FOLD_BATCH 8
template <typename T, int B = BN_FOLD_BATCH, typename I>
__device__ __forceinline__ T fold_partials(const float* p, u64 total, u64 base, u64 step, I first, I splits, I stride) {
  T acc = Partial<T>::zero();
  I k = first;
  for (; k + (I)(B - 1) * stride < splits; k += (I)B * stride) {
    T got[B];
#pragma unroll
    for (int j = 0; j < B; ++j) got[j] = Partial<T>::get(p, total, base + (u64)(k + (I)j * stride) * step);
#pragma unroll
    for (int j = 0; j < B; ++j) acc = Partial<T>::combine(acc, got[j]);
  }
  for (; k < splits; k += stride) acc = Partial<T>::combine(acc, Partial<T>::get(p, total, base + (u64)k * step));
  return acc;
}

// The last-block handshake. Every thread that wrote a partial calls this after its writes
// (all threads of the block must call it). Returns true in exactly one block per counter:
// the one that arrives last, which then sees every other block's partial. That block must
// reset the counter to 0 (counter_reset) once done, so the next launch starts from zero
// without a memset.
__device__ __forceinline__ bool arrive_last(u32* counter, u32 expected, int* sm_flag) {
  __threadfence();  // make this thread's partial visible device-wide before the count
  __syncthreads();  // every writer of the block has fenced
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const u32 prev = atomicAdd(counter, 1u);
    *sm_flag = prev == expected - 1u;
  }
  __syncthreads();
  const bool last = *sm_flag != 0;
  if (last) __threadfence();  // order the partial reads after the observed count
  return last;
}

__device__ __forceinline__ void counter_reset(u32* counter) {
  if (threadIdx.x == 0 && threadIdx.y == 0) *counter = 0u;
}

// ---------------------------------------------------------------- finalize
// Forward statistics of channel c from its moments of x - pivot: saved mean/invstd,
// running-statistics update, and the per-channel (mean, scale, shift) of the normalize
// pass, written to the workspace and returned. f64 throughout, as the CPU backend.
// `commit` false: compute only (the persistent kernels' blocks other than a channel's first
// split derive the same values from the same partials but leave the writes to that one).
__device__ __forceinline__ void finalize_stats(const BnArgs& a, u64 c, const Moments& mo, float pivot,
                                               float& mean_f, float& scale_f, float& shift_f, bool commit = true) {
  const double mean = (double)pivot + (double)mo.mean;
  const double var = fmax((double)mo.m2 / a.m, 0.0);
  const double inv = 1.0 / sqrt(var + (double)a.eps);
  const double w = a.weight ? (double)a.weight[c] : 1.0;
  mean_f = (float)mean;
  scale_f = (float)(w * inv);
  shift_f = a.bias ? a.bias[c] : 0.f;
  if (!commit) return;
  if (a.saved_mean) a.saved_mean[c] = mean_f;
  if (a.saved_invstd) a.saved_invstd[c] = (float)inv;
  if (a.running_mean) {
    const double f = a.factor;
    const double v = (a.flags & BN_F_UNBIASED) ? var * a.m / (a.m - 1.0) : var;
    a.running_mean[c] = (float)((1.0 - f) * (double)a.running_mean[c] + f * mean);
    a.running_var[c] = (float)((1.0 - f) * (double)a.running_var[c] + f * v);
  }
  const u64 C = a.c;
  a.params[c] = mean_f;
  a.params[C + c] = scale_f;
  a.params[2 * C + c] = shift_f;
}

// Backward per-channel step: dweight = sgx * invstd, dbias = sg, and the map of the
// elementwise pass dx = a * ((g - gmean) + k * (x - mean)), written to the workspace and
// returned. Training: gmean = sg / M, k = -invstd^2 * sgx / M. Eval: gmean = k = 0 and
// invstd = f32(1 / sqrt(running_var + eps)).
struct GradMap {
  float mean, a, gmean, k;
};

__device__ __forceinline__ float channel_mean(const BnArgs& a, u64 c) {
  return (a.flags & BN_F_TRAINING) ? __ldg(a.saved_mean + c) : __ldg(a.running_mean + c);
}

// The mean the backward sums subtract: the channel's f32 mean rounded to the activation
// type E (itself for f32). x lies on E's grid and the mean on f32's, so x - mean rounds
// the same way for every x of a binade: a bias that sum g multiplies, large when g has a
// large mean (dweight 3e-5 relative off on a bf16 4x3x64x80 case). x - mean_hi is exact in
// f32 (both on E's grid, close), and finalize_grad takes the rest, (mean - mean_hi) * sum g,
// off in f64. A mean beyond E's range (a user's running mean with f16 data) keeps the f32
// mean (the correction is then 0).
template <class E>
__device__ __forceinline__ float mean_on_grid(float mean) {
  const float hi = E::to_f32(E::from_f32(mean));
  return (__float_as_uint(hi) & 0x7f800000u) != 0x7f800000u ? hi : mean;
}

// sgx of the finalize: sum g * (x - mean) from the lanes' sum g * (x - mean_hi).
__device__ __forceinline__ double centered_gx(const Sums& s, float mean, float mean_hi) {
  return (double)s.gx - ((double)mean - (double)mean_hi) * (double)s.g;
}

// `mean` is the channel's f32 mean (dx uses it), `mean_hi` the one the sums subtracted.
__device__ __forceinline__ GradMap finalize_grad(const BnArgs& a, u64 c, const Sums& s, float mean, float mean_hi,
                                                 bool commit = true) {
  const bool training = (a.flags & BN_F_TRAINING) != 0;
  const double inv = training ? (double)__ldg(a.saved_invstd + c)
                              : (double)(float)(1.0 / sqrt((double)__ldg(a.running_var + c) + (double)a.eps));
  const double w = a.weight ? (double)__ldg(a.weight + c) : 1.0;
  GradMap g;
  g.mean = mean;
  g.a = (float)(w * inv);
  const double sgx = centered_gx(s, mean, mean_hi);
  g.gmean = training ? (float)((double)s.g / a.m) : 0.f;
  g.k = training ? (float)(-inv * inv * sgx / a.m) : 0.f;
  if (!commit) return g;
  if (a.dweight) a.dweight[c] = (float)(sgx * inv);
  if (a.dbias) a.dbias[c] = s.g;
  const u64 C = a.c;
  a.params[c] = g.mean;
  a.params[C + c] = g.a;
  a.params[2 * C + c] = g.gmean;
  a.params[3 * C + c] = g.k;
  return g;
}

// Eval-mode map straight from the running statistics (no reduction), in f32.
__device__ __forceinline__ GradMap grad_map_from_running(const BnArgs& a, u64 c) {
  GradMap g;
  g.mean = __ldg(a.running_mean + c);
  const float inv = 1.0f / sqrtf(__ldg(a.running_var + c) + a.eps);
  g.a = ldg_or(a.weight, c, 1.f) * inv;
  g.gmean = 0.f;
  g.k = 0.f;
  return g;
}

__device__ __forceinline__ GradMap grad_map_from_params(const BnArgs& a, u64 c) {
  const u64 C = a.c;
  GradMap g;
  g.mean = __ldg(a.params + c);
  g.a = __ldg(a.params + C + c);
  g.gmean = __ldg(a.params + 2 * C + c);
  g.k = __ldg(a.params + 3 * C + c);
  return g;
}

// g of one element: dy, or 0 where a fused ReLU was inactive (y <= 0). A NaN y passes dy,
// as in the CPU backend.
__device__ __forceinline__ float grad_of(bool relu, float dy, float y) {
  return (relu && y <= 0.f) ? 0.f : dy;
}

__device__ __forceinline__ float dx_of(const GradMap& m, float g, float x) {
  return m.a * fmaf(m.k, x - m.mean, g - m.gmean);
}
