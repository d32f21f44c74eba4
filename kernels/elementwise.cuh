// The elementwise passes, shared by their own kernels and by the fused (single-launch)
// paths of the reduction kernels:
//   forward:  y = act((x - mean) * scale + shift [+ z])   (one subtraction, one FMA)
//   backward: dx = a * ((g - gmean) + k * (x - mean)), dz = g, g = dy gated by y > 0
//
// Channels-first addressing: a channel is N planes of S contiguous elements, C planes
// apart. Its vector index i in [0, N * S / V) sits at element c * S + i * V + n * (C-1) * S
// with n = i / (S / V) (a multiply-high division). Channels-last: a thread owns V adjacent
// channels and walks rows.
#pragma once
#include "reduce.cuh"

// The fusion options are runtime flags, uniform over the grid: the branches they cost are
// noise next to the memory traffic, and one copy of each loop keeps the PTX small (and the
// driver's JIT compile of it short).
struct Fusion {
  bool add, relu;  // forward: residual add, ReLU
  __device__ __forceinline__ explicit Fusion(u32 flags)
      : add((flags & BN_F_ADD) != 0), relu((flags & BN_F_RELU) != 0) {}
};

struct GradFusion {
  bool relu, dz;  // backward: ReLU gate, write dz
  __device__ __forceinline__ GradFusion(u32 flags, const void* dz_ptr)
      : relu((flags & BN_F_RELU) != 0), dz(dz_ptr != nullptr) {}
};

__device__ __forceinline__ float norm_of(const Fusion& f, float x, float z, float mean, float scale, float shift) {
  float v = fmaf(x - mean, scale, shift);
  if (f.add) v += z;
  if (f.relu) v = relu(v);
  return v;
}

// Element offset of vector i of channel c (channels-first).
template <class I, int V>
__device__ __forceinline__ I cf_offset(const BnArgs& a, I c, I i, I S, I gap) {
  return c * S + i * (I)V + fast_div<I>(i, a.div_inner) * gap;
}

// Channel of vector i of the whole tensor (channels-first): plane q = i / (S / V), q mod C.
template <class I>
__device__ __forceinline__ I cf_channel(const BnArgs& a, I i) {
  const I q = fast_div<I>(i, a.div_inner);
  return q - fast_div<I>(q, a.div_c) * (I)a.c;
}

// Per-channel map of the forward pass.
struct NormMap {
  float mean, scale, shift;
};

__device__ __forceinline__ NormMap norm_map(const BnArgs& a, u64 c, bool from_running) {
  NormMap m;
  if (from_running) {
    params_from_running(a, c, m.mean, m.scale, m.shift);
  } else {
    m.mean = __ldg(a.params + c);
    m.scale = __ldg(a.params + a.c + c);
    m.shift = __ldg(a.params + 2 * a.c + c);
  }
  return m;
}

// ---------------------------------------------------------------- forward
// U vectors at element offsets off[u]; vector u uses map m[u] (channels-first: one channel
// per vector) or, with PER_LANE, lane v uses map m[v] (channels-last: V channels per
// vector). All loads are issued before the first store.
template <class E, int V, int U, bool PER_LANE, int NM>
__device__ __forceinline__ void norm_group(const BnArgs& a, const Fusion& f, const u64 (&off)[U],
                                           const NormMap (&m)[NM]) {
  typedef typename E::T T;
  float x[U][V], z[U][V];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    IO<E, V>::load((const T*)a.x + off[u], x[u]);
    if (f.add) IO<E, V>::load((const T*)a.z + off[u], z[u]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const NormMap& q = m[PER_LANE ? v : u];
      x[u][v] = norm_of(f, x[u][v], f.add ? z[u][v] : 0.f, q.mean, q.scale, q.shift);
    }
    IO<E, V>::store((T*)a.y + off[u], x[u]);
  }
}

// One channel (channels-first), vectors start, start + stride, ... (fused path).
template <class E, class I, int V>
__device__ __forceinline__ void normalize_channel_cf(const BnArgs& a, I c, I start, I stride, const NormMap& map) {
  constexpr int U = EwUnroll<V>::value;
  const Fusion f(a.flags);
  const I S = (I)a.s, MV = (I)a.n * (S / (I)V), gap = ((I)a.c - 1) * S;
  NormMap mu[U];
#pragma unroll
  for (int u = 0; u < U; ++u) mu[u] = map;
  strided<U>(
      start, MV, stride,
      [&](I i) {
        u64 off[U];
#pragma unroll
        for (int u = 0; u < U; ++u) off[u] = cf_offset<I, V>(a, c, i + (I)u * stride, S, gap);
        norm_group<E, V, U, false, U>(a, f, off, mu);
      },
      [&](I i) {
        const u64 off[1] = {cf_offset<I, V>(a, c, i, S, gap)};
        const NormMap m1[1] = {map};
        norm_group<E, V, 1, false, 1>(a, f, off, m1);
      });
}

// The whole tensor (channels-first), flat, grid-stride.
template <class E, class I, int V>
__device__ __forceinline__ void normalize_flat_cf(const BnArgs& a) {
  constexpr int U = EwUnroll<V>::value;
  const Fusion f(a.flags);
  const bool from_running = (a.flags & BN_F_FROM_RUNNING) != 0;
  const I NV = (I)(a.numel / (u64)V);
  const I stride = (I)gridDim.x * (I)BN_THREADS;
  strided<U>(
      (I)blockIdx.x * (I)BN_THREADS + (I)threadIdx.x, NV, stride,
      [&](I i) {
        u64 off[U];
        NormMap m[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const I j = i + (I)u * stride;
          off[u] = (u64)j * V;
          m[u] = norm_map(a, cf_channel<I>(a, j), from_running);
        }
        norm_group<E, V, U, false, U>(a, f, off, m);
      },
      [&](I i) {
        const u64 off[1] = {(u64)i * V};
        const NormMap m1[1] = {norm_map(a, cf_channel<I>(a, i), from_running)};
        norm_group<E, V, 1, false, 1>(a, f, off, m1);
      });
}

// Rows r0, r0 + rstride, ... of the V channels [ch0, ch0 + V) (channels-last).
template <class E, class I, int V>
__device__ __forceinline__ void normalize_rows_cl(const BnArgs& a, I ch0, I r0, I rstride, const NormMap (&m)[V]) {
  constexpr int U = EwUnroll<V>::value;
  const Fusion f(a.flags);
  const I C = (I)a.c, R = (I)(a.n * a.s);
  strided<U>(
      r0, R, rstride,
      [&](I r) {
        u64 off[U];
#pragma unroll
        for (int u = 0; u < U; ++u) off[u] = (u64)(r + (I)u * rstride) * C + ch0;
        norm_group<E, V, U, true, V>(a, f, off, m);
      },
      [&](I r) {
        const u64 off[1] = {(u64)r * C + ch0};
        norm_group<E, V, 1, true, V>(a, f, off, m);
      });
}

// ---------------------------------------------------------------- backward elementwise
template <class E, int V, int U, bool PER_LANE, int NM>
__device__ __forceinline__ void grad_group(const BnArgs& a, const GradFusion& f, const u64 (&off)[U],
                                           const GradMap (&m)[NM]) {
  typedef typename E::T T;
  float dy[U][V], x[U][V], y[U][V];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    IO<E, V>::load((const T*)a.dy + off[u], dy[u]);
    IO<E, V>::load((const T*)a.x + off[u], x[u]);
    if (f.relu) IO<E, V>::load((const T*)a.y + off[u], y[u]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float g = grad_of(f.relu, dy[u][v], f.relu ? y[u][v] : 0.f);
      x[u][v] = dx_of(m[PER_LANE ? v : u], g, x[u][v]);
      dy[u][v] = g;
    }
    IO<E, V>::store((T*)a.dx + off[u], x[u]);
    if (f.dz) IO<E, V>::store((T*)a.dz + off[u], dy[u]);
  }
}

template <class E, class I, int V>
__device__ __forceinline__ void grad_channel_cf(const BnArgs& a, I c, I start, I stride, const GradMap& map) {
  constexpr int U = EwUnroll<V>::value;
  const GradFusion f(a.flags, a.dz);
  const I S = (I)a.s, MV = (I)a.n * (S / (I)V), gap = ((I)a.c - 1) * S;
  GradMap mu[U];
#pragma unroll
  for (int u = 0; u < U; ++u) mu[u] = map;
  strided<U>(
      start, MV, stride,
      [&](I i) {
        u64 off[U];
#pragma unroll
        for (int u = 0; u < U; ++u) off[u] = cf_offset<I, V>(a, c, i + (I)u * stride, S, gap);
        grad_group<E, V, U, false, U>(a, f, off, mu);
      },
      [&](I i) {
        const u64 off[1] = {cf_offset<I, V>(a, c, i, S, gap)};
        const GradMap m1[1] = {map};
        grad_group<E, V, 1, false, 1>(a, f, off, m1);
      });
}

template <class E, class I, int V>
__device__ __forceinline__ void grad_flat_cf(const BnArgs& a) {
  constexpr int U = EwUnroll<V>::value;
  const GradFusion f(a.flags, a.dz);
  const bool from_running = (a.flags & BN_F_FROM_RUNNING) != 0;
  const I NV = (I)(a.numel / (u64)V);
  const I stride = (I)gridDim.x * (I)BN_THREADS;
  auto map_of = [&](I i) -> GradMap {
    const I c = cf_channel<I>(a, i);
    return from_running ? grad_map_from_running(a, c) : grad_map_from_params(a, c);
  };
  strided<U>(
      (I)blockIdx.x * (I)BN_THREADS + (I)threadIdx.x, NV, stride,
      [&](I i) {
        u64 off[U];
        GradMap m[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const I j = i + (I)u * stride;
          off[u] = (u64)j * V;
          m[u] = map_of(j);
        }
        grad_group<E, V, U, false, U>(a, f, off, m);
      },
      [&](I i) {
        const u64 off[1] = {(u64)i * V};
        const GradMap m1[1] = {map_of(i)};
        grad_group<E, V, 1, false, 1>(a, f, off, m1);
      });
}

template <class E, class I, int V>
__device__ __forceinline__ void grad_rows_cl(const BnArgs& a, I ch0, I r0, I rstride, const GradMap (&m)[V]) {
  constexpr int U = EwUnroll<V>::value;
  const GradFusion f(a.flags, a.dz);
  const I C = (I)a.c, R = (I)(a.n * a.s);
  strided<U>(
      r0, R, rstride,
      [&](I r) {
        u64 off[U];
#pragma unroll
        for (int u = 0; u < U; ++u) off[u] = (u64)(r + (I)u * rstride) * C + ch0;
        grad_group<E, V, U, true, V>(a, f, off, m);
      },
      [&](I r) {
        const u64 off[1] = {(u64)r * C + ch0};
        grad_group<E, V, 1, true, V>(a, f, off, m);
      });
}
