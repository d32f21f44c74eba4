// Backward.
//   bn_bwd_reduce_*: per-channel sums sg = sum g, sgx = sum g * (x - mean) (g = dy, gated
//     by y > 0 with a fused ReLU; the lanes subtract the mean rounded to the activation
//     type and the finalize corrects the total in f64, see mean_on_grid), combined over lanes, warps, the block and (split
//     channels) the blocks of the channel through the last-block handshake; then in the
//     same launch: dweight = sgx * invstd, dbias = sg, and the per-channel map of the
//     elementwise pass (workspace). With BN_F_FUSED (one block per channel or channel tile)
//     the block goes on to write dx (and dz) of its own slice: one launch in all.
//   bn_bwd_dx_*: dx = a * ((g - gmean) + k * (x - mean)), dz = g, with the map from the
//     workspace, or (BN_F_FROM_RUNNING: eval mode without parameter gradients, no
//     reduction needed) from the running statistics.
//
// Entry points: bn_bwd_reduce_{nchw,nhwc}_{f32,f16,bf16}[_i64],
//               bn_bwd_dx_{nchw,nhwc}_{f32,f16,bf16}[_i64].
//   Launch shapes as the forward statistics (reduce) and normalize (dx) kernels;
//   nhwc reduce: dynamic shared memory (2 * V * 256 + 4 * bdx * V) floats.
#include "elementwise.cuh"

// Add U vectors' worth (or one, U == 1) of g and g * (x - mean) into acc lanes [0, U * V).
template <class E, int V, int U, int K>
__device__ __forceinline__ void grad_sums_group(const BnArgs& a, bool relu, const u64 (&off)[U],
                                                const float (&mean)[V], SumLanes<K>& acc) {
  typedef typename E::T T;
  float dy[U][V], x[U][V], y[U][V];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    IO<E, V>::load((const T*)a.dy + off[u], dy[u]);
    IO<E, V>::load((const T*)a.x + off[u], x[u]);
    if (relu) IO<E, V>::load((const T*)a.y + off[u], y[u]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float g = grad_of(relu, dy[u][v], relu ? y[u][v] : 0.f);
      acc.g[u * V + v] += g;
      acc.gx[u * V + v] = fmaf(g, x[u][v] - mean[v], acc.gx[u * V + v]);
    }
  }
}

// ---------------------------------------------------------------- channels-first
template <class E, class I, int V>
__device__ __forceinline__ void reduce_nchw(const BnArgs& a) {
  constexpr int U = Unroll<V>::value;
  constexpr int K = U * V;
  __shared__ Sums sm_warp[BN_WARPS];
  __shared__ GradMap sm_map;
  __shared__ int sm_last;

  const I C = (I)a.c, S = (I)a.s;
  const I MV = (I)a.n * (S / (I)V);
  const I gap = (C - 1) * S;
  const I splits = (I)gridDim.y, split = (I)blockIdx.y;
  const I stride = splits * (I)BN_THREADS;
  const bool fused = (a.flags & BN_F_FUSED) != 0;
  const bool relu = (a.flags & BN_F_RELU) != 0;

  for (I c = blockIdx.x; c < C; c += gridDim.x) {
    float mean[V];
    const float mean_c = channel_mean(a, c);
    const float mean_hi = mean_on_grid<E>(mean_c);
#pragma unroll
    for (int v = 0; v < V; ++v) mean[v] = mean_hi;
    SumLanes<K> acc;
    acc.init();
    strided<U>(
        split * (I)BN_THREADS + (I)threadIdx.x, MV, stride,
        [&](I i) {
          u64 off[U];
#pragma unroll
          for (int u = 0; u < U; ++u) off[u] = cf_offset<I, V>(a, c, i + (I)u * stride, S, gap);
          grad_sums_group<E, V, U, K>(a, relu, off, mean, acc);
        },
        [&](I i) {
          u64 off[1] = {cf_offset<I, V>(a, c, i, S, gap)};
          grad_sums_group<E, V, 1, K>(a, relu, off, mean, acc);
        });
    Sums lanes[V];
    fold_sums<V, U>(acc, lanes);
    Sums s = block_merge(fold_all<V>(lanes), sm_warp);

    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (threadIdx.x == 0) put(a.partials, total, (u64)c * splits + split, s);
      if (!arrive_last(a.counters + c, (u32)splits, &sm_last)) continue;
      s = fold_partials<Sums>(a.partials, total, (u64)c * splits, 1, (I)threadIdx.x, splits, (I)BN_THREADS);
      s = block_merge(s, sm_warp);
      counter_reset(a.counters + c);
    }
    if (threadIdx.x == 0) sm_map = finalize_grad(a, c, s, mean_c, mean_hi);
    if (fused) {  // uniform; the host sets it only with splits == 1
      __syncthreads();
      const GradMap map = sm_map;
      grad_channel_cf<E, I, V>(a, c, (I)threadIdx.x, (I)BN_THREADS, map);
    }
    __syncthreads();  // shared memory is reused by the next channel
  }
}

// ---------------------------------------------------------------- channels-last
template <class E, class I, int V>
__device__ __forceinline__ void reduce_nhwc(const BnArgs& a) {
  constexpr int U = Unroll<V>::value;
  constexpr int K = U * V;
  BN_DYNAMIC_SMEM(sm);  // [2][V][bdy][bdx] sums, then [4][bdx * V] maps
  __shared__ int sm_last;

  const Tile2D t;
  const I C = (I)a.c, R = (I)(a.n * a.s);
  const I lanes = (I)t.bdx * V;
  const I tiles = (C + lanes - 1) / lanes;
  const I splits = (I)gridDim.y, split = (I)blockIdx.y;
  const I rstride = splits * (I)t.bdy;
  const bool fused = (a.flags & BN_F_FUSED) != 0;
  const bool relu = (a.flags & BN_F_RELU) != 0;
  float* sp = sm + 2 * V * BN_THREADS;

  for (I tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const I ch0 = tile * lanes + (I)t.tx * V;
    const bool active = ch0 < C;
    float mean[V], mean_hi[V];
    Sums s[V];
    if (active) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        mean[v] = channel_mean(a, (u64)ch0 + v);
        mean_hi[v] = mean_on_grid<E>(mean[v]);
      }
      SumLanes<K> acc;
      acc.init();
      strided<U>(
          split * (I)t.bdy + (I)t.ty, R, rstride,
          [&](I r) {
            u64 off[U];
#pragma unroll
            for (int u = 0; u < U; ++u) off[u] = (u64)(r + (I)u * rstride) * C + ch0;
            grad_sums_group<E, V, U, K>(a, relu, off, mean_hi, acc);
          },
          [&](I r) {
            u64 off[1] = {(u64)r * C + ch0};
            grad_sums_group<E, V, 1, K>(a, relu, off, mean_hi, acc);
          });
      fold_sums<V, U>(acc, s);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        s[v] = sums_zero();
        mean[v] = 0.f;
        mean_hi[v] = 0.f;
      }
    }
    column_sum<V>(s, sm, t);

    if (splits > 1) {
      const u64 total = (u64)C * splits;
      if (t.ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) put(a.partials, total, (u64)split * C + ch0 + v, s[v]);
      }
      if (!arrive_last(a.counters + tile, (u32)splits, &sm_last)) continue;
#pragma unroll
      for (int v = 0; v < V; ++v)
        s[v] = active ? fold_partials<Sums>(a.partials, total, (u64)ch0 + v, C, (I)t.ty, splits, (I)t.bdy) : sums_zero();
      column_sum<V>(s, sm, t);
      counter_reset(a.counters + tile);
    }
    if (t.ty == 0 && active) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const GradMap g = finalize_grad(a, (u64)ch0 + v, s[v], mean[v], mean_hi[v]);
        const u32 j = t.tx * V + v;
        sp[j] = g.mean;
        sp[lanes + j] = g.a;
        sp[2 * lanes + j] = g.gmean;
        sp[3 * lanes + j] = g.k;
      }
    }
    if (fused) {  // uniform; the host sets it only with splits == 1
      __syncthreads();
      if (active) {
        GradMap m[V];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const u32 j = t.tx * V + v;
          m[v].mean = sp[j];
          m[v].a = sp[lanes + j];
          m[v].gmean = sp[2 * lanes + j];
          m[v].k = sp[3 * lanes + j];
        }
        grad_rows_cl<E, I, V>(a, ch0, (I)t.ty, (I)t.bdy, m);
      }
    }
    __syncthreads();  // shared memory is reused by the next tile
  }
}

// ---------------------------------------------------------------- dx kernels
template <class E, class I, int V>
__device__ __forceinline__ void dx_nhwc(const BnArgs& a) {
  const Tile2D t;
  const I C = (I)a.c;
  const I lanes = (I)t.bdx * V;
  const I tiles = (C + lanes - 1) / lanes;
  const bool from_running = (a.flags & BN_F_FROM_RUNNING) != 0;
  for (I tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const I ch0 = tile * lanes + (I)t.tx * V;
    if (ch0 >= C) continue;  // no barrier in this kernel
    GradMap m[V];
#pragma unroll
    for (int v = 0; v < V; ++v)
      m[v] = from_running ? grad_map_from_running(a, (u64)ch0 + v) : grad_map_from_params(a, (u64)ch0 + v);
    grad_rows_cl<E, I, V>(a, ch0, (I)blockIdx.y * (I)t.bdy + (I)t.ty, (I)gridDim.y * (I)t.bdy, m);
  }
}

// ---------------------------------------------------------------- entry points
template <class E, class I>
__device__ __forceinline__ void bwd_reduce_nchw(const BnArgs& a) {
  if (a.flags & BN_F_VEC) reduce_nchw<E, I, VecCF<E>::value>(a);
  else reduce_nchw<E, I, 1>(a);
}

template <class E, class I>
__device__ __forceinline__ void bwd_reduce_nhwc(const BnArgs& a) {
  if (a.flags & BN_F_VEC) reduce_nhwc<E, I, BN_VEC_CL>(a);
  else reduce_nhwc<E, I, 1>(a);
}

template <class E, class I>
__device__ __forceinline__ void bwd_dx_nchw(const BnArgs& a) {
  if (a.flags & BN_F_VEC) grad_flat_cf<E, I, VecCF<E>::value>(a);
  else grad_flat_cf<E, I, 1>(a);
}

template <class E, class I>
__device__ __forceinline__ void bwd_dx_nhwc(const BnArgs& a) {
  if (a.flags & BN_F_VEC) dx_nhwc<E, I, BN_VEC_CL>(a);
  else dx_nhwc<E, I, 1>(a);
}

#define BN_BWD(tag, E)                                                                        \
  BN_REDUCE_KERNEL bn_bwd_reduce_nchw_##tag(const BnArgs a) { bwd_reduce_nchw<E, u32>(a); }          \
  BN_REDUCE_KERNEL bn_bwd_reduce_nchw_##tag##_i64(const BnArgs a) { bwd_reduce_nchw<E, u64>(a); }    \
  BN_REDUCE_KERNEL bn_bwd_reduce_nhwc_##tag(const BnArgs a) { bwd_reduce_nhwc<E, u32>(a); }          \
  BN_REDUCE_KERNEL bn_bwd_reduce_nhwc_##tag##_i64(const BnArgs a) { bwd_reduce_nhwc<E, u64>(a); }    \
  BN_EW_KERNEL bn_bwd_dx_nchw_##tag(const BnArgs a) { bwd_dx_nchw<E, u32>(a); }                  \
  BN_EW_KERNEL bn_bwd_dx_nchw_##tag##_i64(const BnArgs a) { bwd_dx_nchw<E, u64>(a); }            \
  BN_EW_KERNEL bn_bwd_dx_nhwc_##tag(const BnArgs a) { bwd_dx_nhwc<E, u32>(a); }                  \
  BN_EW_KERNEL bn_bwd_dx_nhwc_##tag##_i64(const BnArgs a) { bwd_dx_nhwc<E, u64>(a); }

BN_BWD(f32, F32)
BN_BWD(f16, F16)
BN_BWD(bf16, BF16)
