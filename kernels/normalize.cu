// Normalize: y = act((x - mean) * scale + shift [+ z]) with per-channel (mean, scale,
// shift) either from the workspace (training, written by bn_fwd_stats) or computed from
// the running statistics (inference, BN_F_FROM_RUNNING: scale = w / sqrt(var + eps)).
//
// Entry points: bn_fwd_norm_{nchw,nhwc}_{f32,f16,bf16}[_i64].
//   nchw: flat over the tensor, grid-stride, 1-D block of 256; channel = (i / S) mod C by
//         multiply-high divisions.
//   nhwc: grid (channel tiles, row blocks), block (bdx, bdy); a thread derives the params
//         of its V channels once and walks rows.
#include "elementwise.cuh"

template <class E, class I, int V>
__device__ __forceinline__ void norm_nhwc(const BnArgs& a) {
  const Tile2D t;
  const I C = (I)a.c;
  const I lanes = (I)t.bdx * V;
  const I tiles = (C + lanes - 1) / lanes;
  const bool from_running = (a.flags & BN_F_FROM_RUNNING) != 0;
  for (I tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const I ch0 = tile * lanes + (I)t.tx * V;
    if (ch0 >= C) continue;  // no barrier in this kernel
    NormMap map[V];
#pragma unroll
    for (int v = 0; v < V; ++v) map[v] = norm_map(a, (u64)ch0 + v, from_running);
    normalize_rows_cl<E, I, V>(a, ch0, (I)blockIdx.y * (I)t.bdy + (I)t.ty, (I)gridDim.y * (I)t.bdy, map);
  }
}

template <class E, class I>
__device__ __forceinline__ void fwd_norm_nchw(const BnArgs& a) {
  if (a.flags & BN_F_VEC) normalize_flat_cf<E, I, VecCF<E>::value>(a);
  else normalize_flat_cf<E, I, 1>(a);
}

template <class E, class I>
__device__ __forceinline__ void fwd_norm_nhwc(const BnArgs& a) {
  if (a.flags & BN_F_VEC) norm_nhwc<E, I, BN_VEC_CL>(a);
  else norm_nhwc<E, I, 1>(a);
}

#define BN_FWD_NORM(tag, E)                                                                 \
  BN_EW_KERNEL bn_fwd_norm_nchw_##tag(const BnArgs a) { fwd_norm_nchw<E, u32>(a); }            \
  BN_EW_KERNEL bn_fwd_norm_nchw_##tag##_i64(const BnArgs a) { fwd_norm_nchw<E, u64>(a); }      \
  BN_EW_KERNEL bn_fwd_norm_nhwc_##tag(const BnArgs a) { fwd_norm_nhwc<E, u32>(a); }            \
  BN_EW_KERNEL bn_fwd_norm_nhwc_##tag##_i64(const BnArgs a) { fwd_norm_nhwc<E, u64>(a); }

BN_FWD_NORM(f32, F32)
BN_FWD_NORM(f16, F16)
BN_FWD_NORM(bf16, BF16)
