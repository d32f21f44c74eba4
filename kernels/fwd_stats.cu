// Forward statistics: per-channel Welford moments of x, merged with Chan's formula over
// lanes, warps, the block and (when a channel is split over several blocks) the blocks of
// the channel; then, in the same launch, the finalize step (saved mean/invstd, running
// statistics, normalize parameters). With BN_F_FUSED (one block per channel or channel
// tile) the block goes on to normalize its own slice: the whole training forward in one
// launch, the second read of x served mostly by L2.
//
// Entry points: bn_fwd_stats_{nchw,nhwc}_{f32,f16,bf16}[_i64].
//   nchw: grid (channels, splits), 1-D block of 256; partial slot c * splits + split.
//   nhwc: grid (channel tiles, splits), block (bdx, bdy), dynamic shared memory
//         (3 * V * 256 + 3 * bdx * V) floats; partial slot split * C + channel.
#include "elementwise.cuh"

// ---------------------------------------------------------------- channels-first
template <class E, class I, int V>
__device__ __forceinline__ void stats_nchw(const BnArgs& a) {
  constexpr int U = Unroll<V>::value;
  constexpr int K = U * V;
  typedef typename E::T T;
  __shared__ Moments sm_warp[BN_WARPS];
  __shared__ float sm_params[3];
  __shared__ int sm_last;

  const T* x = (const T*)a.x;
  const I C = (I)a.c, S = (I)a.s;
  const I MV = (I)a.n * (S / (I)V);
  const I gap = (C - 1) * S;
  const I splits = (I)gridDim.y, split = (I)blockIdx.y;
  const I stride = splits * (I)BN_THREADS;
  const bool fused = (a.flags & BN_F_FUSED) != 0;

  for (I c = blockIdx.x; c < C; c += gridDim.x) {
    const float pivot = E::to_f32(__ldg(x + c * S));
    Lanes<V, U> acc;
    acc.init();
    strided<U>(
        split * (I)BN_THREADS + (I)threadIdx.x, MV, stride,
        [&](I i) {
          float v[K];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float t[V];
            IO<E, V>::load(x + cf_offset<I, V>(a, c, i + (I)u * stride, S, gap), t);
#pragma unroll
            for (int k = 0; k < V; ++k) v[u * V + k] = t[k] - pivot;
          }
          acc.push(v);
        },
        [&](I i) {
          float t[V];
          IO<E, V>::load(x + cf_offset<I, V>(a, c, i, S, gap), t);
#pragma unroll
          for (int k = 0; k < V; ++k) t[k] -= pivot;
          acc.push_first(t);
        });
    Moments lanes[V];
    fold_lanes<V, U>(acc, lanes);
    Moments m = block_merge(fold_all<V>(lanes), sm_warp);

    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (threadIdx.x == 0) put(a.partials, total, (u64)c * splits + split, m);
      if (!arrive_last(a.counters + c, (u32)splits, &sm_last)) continue;
      m = fold_partials<Moments>(a.partials, total, (u64)c * splits, 1, (I)threadIdx.x, splits, (I)BN_THREADS);
      m = block_merge(m, sm_warp);
      counter_reset(a.counters + c);
    }
    if (threadIdx.x == 0) {
      float mean, scale, shift;
      finalize_stats(a, c, m, pivot, mean, scale, shift);
      sm_params[0] = mean;
      sm_params[1] = scale;
      sm_params[2] = shift;
    }
    if (fused) {  // uniform; the host sets it only with splits == 1
      __syncthreads();
      NormMap map;
      map.mean = sm_params[0];
      map.scale = sm_params[1];
      map.shift = sm_params[2];
      normalize_channel_cf<E, I, V>(a, c, (I)threadIdx.x, (I)BN_THREADS, map);
    }
    __syncthreads();  // shared memory is reused by the next channel
  }
}

// ---------------------------------------------------------------- channels-last
template <class E, class I, int V>
__device__ __forceinline__ void stats_nhwc(const BnArgs& a) {
  constexpr int U = Unroll<V>::value;
  constexpr int K = U * V;
  typedef typename E::T T;
  BN_DYNAMIC_SMEM(sm);  // [3][V][bdy][bdx] moments, then [3][bdx * V] params
  __shared__ int sm_last;

  const Tile2D t;
  const T* x = (const T*)a.x;
  const I C = (I)a.c, R = (I)(a.n * a.s);
  const I lanes = (I)t.bdx * V;
  const I tiles = (C + lanes - 1) / lanes;
  const I splits = (I)gridDim.y, split = (I)blockIdx.y;
  const I rstride = splits * (I)t.bdy;
  const bool fused = (a.flags & BN_F_FUSED) != 0;
  float* sp = sm + 3 * V * BN_THREADS;

  for (I tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const I ch0 = tile * lanes + (I)t.tx * V;
    const bool active = ch0 < C;  // vector path: C % V == 0, so all V lanes are channels
    float pivot[V];
    Moments m[V];
    if (active) {
      IO<E, V>::load(x + ch0, pivot);
      Lanes<V, U> acc;
      acc.init();
      strided<U, BN_STATS_ROWS_GROUPS>(
          split * (I)t.bdy + (I)t.ty, R, rstride,
          [&](I r) {
            float v[K];
#pragma unroll
            for (int u = 0; u < U; ++u) {
              float q[V];
              IO<E, V>::load(x + (u64)(r + (I)u * rstride) * C + ch0, q);
#pragma unroll
              for (int k = 0; k < V; ++k) v[u * V + k] = q[k] - pivot[k];
            }
            acc.push(v);
          },
          [&](I r) {
            float q[V];
            IO<E, V>::load(x + (u64)r * C + ch0, q);
#pragma unroll
            for (int k = 0; k < V; ++k) q[k] -= pivot[k];
            acc.push_first(q);
          });
      fold_lanes<V, U>(acc, m);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        m[v] = mo_empty();
        pivot[v] = 0.f;
      }
    }
    column_merge<V>(m, sm, t);

    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (t.ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) put(a.partials, total, (u64)split * C + ch0 + v, m[v]);
      }
      if (!arrive_last(a.counters + tile, (u32)splits, &sm_last)) continue;
#pragma unroll
      for (int v = 0; v < V; ++v)
        m[v] = active ? fold_partials<Moments>(a.partials, total, (u64)ch0 + v, C, (I)t.ty, splits, (I)t.bdy) : mo_empty();
      column_merge<V>(m, sm, t);
      counter_reset(a.counters + tile);
    }
    if (t.ty == 0 && active) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float mean, scale, shift;
        finalize_stats(a, ch0 + v, m[v], pivot[v], mean, scale, shift);
        const u32 j = t.tx * V + v;
        sp[j] = mean;
        sp[lanes + j] = scale;
        sp[2 * lanes + j] = shift;
      }
    }
    if (fused) {  // uniform; the host sets it only with splits == 1
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
        normalize_rows_cl<E, I, V>(a, ch0, (I)t.ty, (I)t.bdy, map);
      }
    }
    __syncthreads();  // shared memory is reused by the next tile
  }
}

// ---------------------------------------------------------------- entry points
template <class E, class I>
__device__ __forceinline__ void fwd_stats_nchw(const BnArgs& a) {
  if (a.flags & BN_F_VEC) stats_nchw<E, I, VecCF<E>::value>(a);
  else stats_nchw<E, I, 1>(a);
}

template <class E, class I>
__device__ __forceinline__ void fwd_stats_nhwc(const BnArgs& a) {
  if (a.flags & BN_F_VEC) stats_nhwc<E, I, BN_VEC_CL>(a);
  else stats_nhwc<E, I, 1>(a);
}

#define BN_FWD_STATS(tag, E)                                                                  \
  BN_REDUCE_KERNEL bn_fwd_stats_nchw_##tag(const BnArgs a) { fwd_stats_nchw<E, u32>(a); }            \
  BN_REDUCE_KERNEL bn_fwd_stats_nchw_##tag##_i64(const BnArgs a) { fwd_stats_nchw<E, u64>(a); }      \
  BN_REDUCE_KERNEL bn_fwd_stats_nhwc_##tag(const BnArgs a) { fwd_stats_nhwc<E, u32>(a); }            \
  BN_REDUCE_KERNEL bn_fwd_stats_nhwc_##tag##_i64(const BnArgs a) { fwd_stats_nhwc<E, u64>(a); }

BN_FWD_STATS(f32, F32)
BN_FWD_STATS(f16, F16)
BN_FWD_STATS(bf16, BF16)
