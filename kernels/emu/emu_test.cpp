// Runs the real bnorm kernels (kernels/*.cu) on the CPU through cuda_emu.h and compares
// every op against a float64 reference, over a matrix of dtypes, layouts, odd and
// vector-friendly shapes, scalar and vector paths, 32- and 64-bit index entry points,
// split and unsplit reductions, fused and two-launch paths, and grids smaller than the
// channel count (so the kernels' channel/tile loops run). Also checks that every
// last-block counter is back at zero after each launch.
//
// Build and run: ci/kernel-emu.sh (g++ >= 12, C++20). Exit status 0 when all pass.
#include "cuda_emu.h"
// clang-format off
#include "../fwd_stats.cu"
#include "../normalize.cu"
#include "../backward.cu"
#include "../persistent.cu"
// clang-format on

#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>

typedef void (*Kernel)(const BnArgs);

static std::map<std::string, Kernel> kernels() {
  std::map<std::string, Kernel> m;
#define K(n) m[#n] = n; m[#n "_i64"] = n##_i64;
#define KT(stem) K(stem##_f32) K(stem##_f16) K(stem##_bf16)
  KT(bn_fwd_stats_nchw) KT(bn_fwd_stats_nhwc) KT(bn_fwd_norm_nchw) KT(bn_fwd_norm_nhwc)
  KT(bn_bwd_reduce_nchw) KT(bn_bwd_reduce_nhwc) KT(bn_bwd_dx_nchw) KT(bn_bwd_dx_nhwc)
#undef KT
#undef K
#define P(n) m[#n] = n;
#define PT(stem) P(stem##_f32) P(stem##_f16) P(stem##_bf16)
  PT(bn_fwd_persist_nchw) PT(bn_fwd_persist_nhwc) PT(bn_bwd_persist_nchw) PT(bn_bwd_persist_nhwc)
#undef PT
#undef P
  return m;
}
static std::map<std::string, Kernel> g_k = kernels();

// ---------------------------------------------------------------- host mirror of DivMod
static DivMod divmod(u64 d) {
  DivMod r{};
  r.d = d;
  u32 shift = 0;
  while ((1ull << shift) < d) ++shift;
  r.shift = shift;
  unsigned __int128 num = ((unsigned __int128)1 << 64) * (((unsigned __int128)1 << shift) - d);
  r.magic64 = (u64)(num / d + 1);
  r.magic32 = d < (1ull << 31) ? (u32)((((u64)1 << 32) * (((u64)1 << shift) - d)) / d + 1) : 0;
  return r;
}

// ---------------------------------------------------------------- test data
struct Case {
  int n, c, s;
  bool rows;  // channels-last pattern (rows = n * s of c)
};

template <class E>
struct Host {
  static typename E::T from(double v) { return E::from_f32((float)v); }
  static double to(typename E::T v) { return (double)E::to_f32(v); }
};

static double ulp_rel(const char* dt) {
  if (!strcmp(dt, "f32")) return 1.2e-7;
  if (!strcmp(dt, "f16")) return 9.8e-4;
  return 7.9e-3;
}

static int g_failures = 0, g_checks = 0;

static void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    if (g_failures < 40) std::printf("FAIL %s\n", what.c_str());
  }
}

// Compare values with |got - want| <= rel * |want| + abs.
static void compare(const std::string& label, const std::vector<double>& got, const std::vector<double>& want,
                    double rel, double abs) {
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = rel * std::fabs(want[i]) + abs;
    const double r = got[i] == want[i] ? 0.0 : std::fabs(got[i] - want[i]) / bound;
    if (!(r <= worst)) {  // catches NaN
      worst = std::isnan(r) ? INFINITY : r;
      at = i;
    }
  }
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s: worst ratio %.3g at %zu (got %.9g want %.9g)", label.c_str(), worst, at,
                got.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
  expect(worst <= 1.0, buf);
}

struct Geometry {
  EmuDim grid, block;
  size_t smem;
};

static u32 next_pow2(u32 v) {
  u32 p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---------------------------------------------------------------- one configuration
struct Config {
  bool vec, wide, relu, add, fused, small_grid;
  int splits;
  bool persist = false;  // the persistent kernels (splits > 1: a cooperative launch)
};

template <class E>
struct Runner {
  typedef typename E::T T;
  const char* dt;
  Case cs;
  Config cf;
  std::mt19937_64 rng{42};

  u64 N() const { return cs.rows ? (u64)cs.n * cs.s : cs.n; }
  u64 C() const { return cs.c; }
  u64 S() const { return cs.rows ? 1 : cs.s; }
  u64 numel() const { return (u64)cs.n * cs.c * cs.s; }
  u64 M() const { return (u64)cs.n * cs.s; }
  int V() const {
    if (!cf.vec) return 1;
    return cs.rows ? BN_VEC_CL : 16 / (int)sizeof(T);
  }
  // element index of (m, c): m over the channel's values in memory order
  u64 idx(u64 m, u64 c) const {
    if (cs.rows) return m * C() + c;
    const u64 n = m / S(), s = m % S();
    return (n * C() + c) * S() + s;
  }
  std::string name(const char* stem) const {
    return std::string(stem) + (cs.rows ? "_nhwc_" : "_nchw_") + dt + (cf.wide && !cf.persist ? "_i64" : "");
  }
  std::string label(const char* op) const {
    char b[256];
    std::snprintf(b, sizeof b, "%s %s %s n%d c%d s%d vec%d wide%d relu%d add%d fused%d splits%d small%d persist%d", op,
                  dt, cs.rows ? "rows" : "planes", cs.n, cs.c, cs.s, cf.vec, cf.wide, cf.relu, cf.add, cf.fused,
                  cf.splits, cf.small_grid, cf.persist);
    return b;
  }

  std::vector<T> gen(double offset, std::vector<double>* mu_out = nullptr) {
    std::normal_distribution<double> nd;
    std::uniform_real_distribution<double> ud(-2, 2);
    std::vector<double> mu(C()), sd(C());
    for (u64 c = 0; c < C(); ++c) {
      mu[c] = offset + ud(rng);
      sd[c] = 0.5 + std::fabs(ud(rng)) * 0.7;
    }
    std::vector<T> v(numel());
    for (u64 c = 0; c < C(); ++c)
      for (u64 m = 0; m < M(); ++m) v[idx(m, c)] = Host<E>::from(mu[c] + sd[c] * nd(rng));
    if (mu_out) *mu_out = mu;
    return v;
  }
  // Every channel N(mean, sd) (no per-channel spread): gradients with a large common mean.
  std::vector<T> gen_fixed(double mean, double sd) {
    std::normal_distribution<double> nd;
    std::vector<T> v(numel());
    for (u64 i = 0; i < numel(); ++i) v[i] = Host<E>::from(mean + sd * nd(rng));
    return v;
  }
  std::vector<float> vecf(double mean, double sd) {
    std::normal_distribution<double> nd;
    std::vector<float> v(C());
    for (auto& x : v) x = (float)(mean + sd * nd(rng));
    return v;
  }
  std::vector<double> as_double(const std::vector<T>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = Host<E>::to(v[i]);
    return r;
  }

  BnArgs base() const {
    BnArgs a{};
    a.n = N();
    a.c = C();
    a.s = S();
    a.numel = numel();
    a.div_inner = divmod(cs.rows ? 1 : S() / V());
    a.div_c = divmod(C());
    a.m = (double)M();
    a.eps = 1e-5f;
    return a;
  }

  Geometry reduce_geo(int fields, int params) const {
    if (!cs.rows) {
      u32 gx = cf.small_grid ? (u32)std::min<u64>(C(), 2) : (u32)C();
      return {{gx, (u32)cf.splits, 1}, {256, 1, 1}, 0};
    }
    const u32 cv = (u32)((C() + V() - 1) / V());
    const u32 bdx = std::min<u32>(32, next_pow2(cv)), bdy = 256 / bdx;
    const u32 tiles = (cv + bdx - 1) / bdx;
    const u32 gx = cf.small_grid ? std::min<u32>(tiles, 1) : tiles;
    return {{gx, (u32)cf.splits, 1}, {bdx, bdy, 1}, (size_t)(fields * V() * 256 + params * bdx * V()) * 4};
  }
  Geometry ew_geo() const {
    if (!cs.rows) return {{cf.small_grid ? 1u : 7u, 1, 1}, {256, 1, 1}, 0};
    const u32 cv = (u32)((C() + V() - 1) / V());
    const u32 bdx = std::min<u32>(32, next_pow2(cv)), bdy = 256 / bdx;
    const u32 tiles = (cv + bdx - 1) / bdx;
    return {{cf.small_grid ? 1u : tiles, cf.small_grid ? 1u : 3u, 1}, {bdx, bdy, 1}, 0};
  }
  // Persistent kernels: T stored tensors, REG register floats per tensor. Returns the
  // geometry and sets a.slots to what the thread with the most slots needs.
  Geometry persist_geo(int tensors, int reg, BnArgs& a) const {
    const u32 v = (u32)V(), rs = std::max<u32>(1, (u32)reg / v);
    const u32 splits = (u32)cf.splits;
    if (!cs.rows) {
      const u64 mv = (u64)cs.n * (S() / v);
      const u64 nk = (mv + splits * 256 - 1) / (splits * 256);
      a.slots = (u32)(nk > rs ? nk - rs : 0);
      const u32 gx = splits > 1 ? (u32)C() : (cf.small_grid ? (u32)std::min<u64>(C(), 2) : (u32)C());
      return {{gx, splits, 1}, {256, 1, 1}, (size_t)(BN_PERSIST_SCRATCH_CF + tensors * a.slots * v * 256) * 4};
    }
    const u32 cv = (u32)((C() + v - 1) / v);
    const u32 bdx = std::min<u32>(32, next_pow2(cv)), bdy = 256 / bdx;
    const u32 tiles = (cv + bdx - 1) / bdx;
    const u64 nk = (N() + splits * bdy - 1) / (splits * bdy);
    a.slots = (u32)(nk > rs ? nk - rs : 0);
    const u32 gx = splits > 1 ? tiles : (cf.small_grid ? 1u : tiles);
    return {{gx, splits, 1}, {bdx, bdy, 1}, (size_t)(3 * v * 256 + 4 * bdx * v + tensors * a.slots * v * 256) * 4};
  }
  void run_persist(const char* stem, int tensors, int reg, BnArgs& a) {
    u32 barrier = 0;
    u32* counters = a.counters;
    a.counters = &barrier;
    const Geometry g = persist_geo(tensors, reg, a);
    auto it = g_k.find(name(stem));
    if (it == g_k.end()) {
      expect(false, "no kernel " + name(stem));
      return;
    }
    if (cf.splits > 1) emu_launch_cooperative<BnArgs>(it->second, g.grid, g.block, g.smem, a);
    else emu_launch<BnArgs>(it->second, g.grid, g.block, g.smem, a);
    expect((barrier & 0x7fffffffu) == 0, label("persist barrier low bits back at 0"));
    a.counters = counters;
  }
  void run(const char* stem, const Geometry& g, const BnArgs& a) {
    auto it = g_k.find(name(stem));
    if (it == g_k.end()) {
      expect(false, "no kernel " + name(stem));
      return;
    }
    emu_launch<BnArgs>(it->second, g.grid, g.block, g.smem, a);
  }
  u32 flags() const {
    return (cf.vec ? BN_F_VEC : 0) | (cf.relu ? BN_F_RELU : 0) | (cf.add ? BN_F_ADD : 0);
  }

  // ------------------------------------------------------------ forward training + inference
  void forward(double offset) {
    std::vector<T> x = gen(offset), z = gen(0), y(numel(), Host<E>::from(NAN));
    std::vector<float> w = vecf(1, 0.3), b = vecf(0, 0.5), rm = vecf(0, 0.5), rv(C());
    for (auto& v : rv) v = 0.5f + (float)(rng() % 1000) / 700.f;
    std::vector<float> rm0 = rm, rv0 = rv, sm(C(), NAN), si(C(), NAN);
    std::vector<u32> counters(C() + 8, 0);
    std::vector<float> params(4 * C(), NAN), partials(3 * C() * cf.splits + 1, NAN);

    BnArgs a = base();
    a.x = x.data();
    a.z = cf.add ? z.data() : nullptr;
    a.y = y.data();
    a.weight = w.data();
    a.bias = b.data();
    a.running_mean = rm.data();
    a.running_var = rv.data();
    a.saved_mean = sm.data();
    a.saved_invstd = si.data();
    a.params = params.data();
    a.partials = partials.data();
    a.counters = counters.data();
    a.factor = 0.1;
    const u32 f = flags() | BN_F_UNBIASED;
    if (cf.persist) {
      a.flags = f;
      run_persist("bn_fwd_persist", 1, cs.rows ? BN_PERSIST_REG_FWD_CL : BN_PERSIST_REG_FWD, a);
    } else {
      a.flags = f | (cf.fused ? BN_F_FUSED : 0);
      run("bn_fwd_stats", reduce_geo(3, 3), a);
      bool zero = true;
      for (u32 c : counters) zero &= c == 0;
      expect(zero, label("fwd counters reset"));
      if (!cf.fused) {
        a.flags = f;
        run("bn_fwd_norm", ew_geo(), a);
      }
    }

    // reference
    const double Md = (double)M();
    std::vector<double> mean(C()), var(C()), inv(C()), yref(numel()), sd(C());
    std::vector<double> xd = as_double(x), zd = as_double(z);
    for (u64 c = 0; c < C(); ++c) {
      double s = 0;
      for (u64 m = 0; m < M(); ++m) s += xd[idx(m, c)];
      mean[c] = s / Md;
      double q = 0;
      for (u64 m = 0; m < M(); ++m) q += (xd[idx(m, c)] - mean[c]) * (xd[idx(m, c)] - mean[c]);
      var[c] = q / Md;
      sd[c] = std::sqrt(var[c]);
      inv[c] = 1 / std::sqrt(var[c] + 1e-5);
      for (u64 m = 0; m < M(); ++m) {
        const u64 i = idx(m, c);
        double v = (xd[i] - mean[c]) * inv[c] * w[c] + b[c];
        if (cf.add) v += zd[i];
        if (cf.relu && v < 0) v = 0;
        yref[i] = v;
      }
    }
    std::vector<double> smd(sm.begin(), sm.end()), sid(si.begin(), si.end()), rmd(rm.begin(), rm.end()),
        rvd(rv.begin(), rv.end());
    std::vector<double> rm_want(C()), rv_want(C()), sd_scale(C()), zeros(C(), 0.0);
    for (u64 c = 0; c < C(); ++c) {
      rm_want[c] = 0.9 * rm0[c] + 0.1 * mean[c];
      rv_want[c] = 0.9 * rv0[c] + 0.1 * var[c] * Md / (Md - 1);
    }
    // saved mean: relative to the channel's spread (the contract's scale)
    // (plus the f32 rounding of the mean itself, which dominates on offset data)
    std::vector<double> dm(C());
    for (u64 c = 0; c < C(); ++c) dm[c] = (smd[c] - mean[c]) / (1e-5 * sd[c] + 6e-8 * std::fabs(mean[c]) + 1e-30);
    compare(label("fwd saved_mean"), dm, zeros, 0, 1);
    compare(label("fwd saved_invstd"), sid, inv, 2e-5, 0);
    compare(label("fwd running_mean"), rmd, rm_want, 1e-5, 1e-6 * (1 + offset));
    compare(label("fwd running_var"), rvd, rv_want, 2e-5, 1e-7);
    const double r = ulp_rel(dt);
    // y: the output's rounding plus f32 evaluation; offset data also carries the input's own rounding
    double abs = 2 * r + 4 * 1.2e-7 * (std::fabs(offset) + 4) * 2;
    compare(label("fwd y"), as_double(y), yref, 2 * r, abs);

    // inference from the updated running statistics
    std::vector<T> y2(numel(), Host<E>::from(NAN));
    BnArgs b2 = base();
    b2.x = x.data();
    b2.z = cf.add ? z.data() : nullptr;
    b2.y = y2.data();
    b2.weight = w.data();
    b2.bias = b.data();
    b2.running_mean = rm.data();
    b2.running_var = rv.data();
    b2.flags = flags() | BN_F_FROM_RUNNING;
    run("bn_fwd_norm", ew_geo(), b2);
    std::vector<double> y2ref(numel());
    for (u64 c = 0; c < C(); ++c) {
      const double is = 1 / std::sqrt((double)rv[c] + 1e-5);
      for (u64 m = 0; m < M(); ++m) {
        const u64 i = idx(m, c);
        double v = (xd[i] - rm[c]) * is * w[c] + b[c];
        if (cf.add) v += zd[i];
        if (cf.relu && v < 0) v = 0;
        y2ref[i] = v;
      }
    }
    compare(label("inference y"), as_double(y2), y2ref, 2 * r, abs * 4);
  }

  // ------------------------------------------------------------ backward
  // dy_mean > 0: dy = N(dy_mean, 0.5) in every channel (sum g large against sum g * xhat).
  void backward(bool training, bool want_param_grads, double offset, double dy_mean = 0) {
    std::vector<T> x = gen(offset), dy = dy_mean > 0 ? gen_fixed(dy_mean, 0.5) : gen(0), y(numel());
    std::vector<float> w = vecf(1, 0.3), rm = vecf(offset, 0.5), rv(C());
    for (auto& v : rv) v = 0.5f + (float)(rng() % 1000) / 700.f;
    std::vector<double> xd = as_double(x), dyd = as_double(dy);
    const double Md = (double)M();
    // saved statistics: the batch's, rounded to f32 (as the forward saves them)
    std::vector<float> sm(C()), si(C());
    for (u64 c = 0; c < C(); ++c) {
      double s = 0, q = 0;
      for (u64 m = 0; m < M(); ++m) s += xd[idx(m, c)];
      const double mu = s / Md;
      for (u64 m = 0; m < M(); ++m) q += (xd[idx(m, c)] - mu) * (xd[idx(m, c)] - mu);
      sm[c] = (float)mu;
      si[c] = (float)(1 / std::sqrt(q / Md + 1e-5));
      for (u64 m = 0; m < M(); ++m)  // a forward output for the ReLU gate
        y[idx(m, c)] = Host<E>::from((xd[idx(m, c)] - mu) * si[c] * w[c] + 0.1);
    }
    std::vector<T> dx(numel(), Host<E>::from(NAN)), dz(numel(), Host<E>::from(NAN));
    std::vector<float> dw(C(), NAN), db(C(), NAN);
    std::vector<u32> counters(C() + 8, 0);
    std::vector<float> params(4 * C(), NAN), partials(2 * C() * cf.splits + 1, NAN);
    BnArgs a = base();
    a.x = x.data();
    a.y = cf.relu ? y.data() : nullptr;
    a.dy = dy.data();
    a.dx = dx.data();
    a.dz = cf.add ? dz.data() : nullptr;  // `add` stands for "dz requested" here
    a.weight = w.data();
    if (training) {
      a.saved_mean = sm.data();
      a.saved_invstd = si.data();
    } else {
      a.running_mean = rm.data();
      a.running_var = rv.data();
    }
    a.dweight = want_param_grads ? dw.data() : nullptr;
    a.dbias = want_param_grads ? db.data() : nullptr;
    a.params = params.data();
    a.partials = partials.data();
    a.counters = counters.data();
    const u32 f = (cf.vec ? BN_F_VEC : 0) | (cf.relu ? BN_F_RELU : 0) | (training ? BN_F_TRAINING : 0);
    const bool need_sums = training || want_param_grads;
    if (need_sums && cf.persist) {
      a.flags = f;
      run_persist("bn_bwd_persist", 2, BN_PERSIST_REG_BWD, a);
    } else if (need_sums) {
      a.flags = f | (cf.fused ? BN_F_FUSED : 0);
      run("bn_bwd_reduce", reduce_geo(2, 4), a);
      bool zero = true;
      for (u32 c : counters) zero &= c == 0;
      expect(zero, label("bwd counters reset"));
      if (!cf.fused) {
        a.flags = f;
        run("bn_bwd_dx", ew_geo(), a);
      }
    } else {
      a.flags = f | BN_F_FROM_RUNNING;
      run("bn_bwd_dx", ew_geo(), a);
    }

    // reference
    std::vector<double> yd = as_double(y), dxr(numel()), dzr(numel()), dwr(C()), dbr(C()), dws(C()), dbs(C());
    for (u64 c = 0; c < C(); ++c) {
      const double mu = training ? sm[c] : rm[c];
      const double is = training ? si[c] : (double)(float)(1 / std::sqrt((double)rv[c] + 1e-5));
      double sg = 0, sgx = 0, sq_g = 0, sq_gx = 0;
      for (u64 m = 0; m < M(); ++m) {
        const u64 i = idx(m, c);
        const double g = (cf.relu && yd[i] <= 0) ? 0 : dyd[i];
        sg += g;
        sgx += g * (xd[i] - mu);
        sq_g += g * g;
        sq_gx += g * (xd[i] - mu) * is * g * (xd[i] - mu) * is;
      }
      dwr[c] = sgx * is;
      dbr[c] = sg;
      dws[c] = std::sqrt(sq_gx);
      dbs[c] = std::sqrt(sq_g);
      for (u64 m = 0; m < M(); ++m) {
        const u64 i = idx(m, c);
        const double g = (cf.relu && yd[i] <= 0) ? 0 : dyd[i];
        dzr[i] = g;
        dxr[i] = training ? w[c] * is * (g - sg / Md - (xd[i] - mu) * is * is * sgx / Md) : w[c] * is * g;
      }
    }
    const double r = ulp_rel(dt);
    const char* mode = dy_mean > 0 ? (training ? "bwd dy_mean" : "bwd_eval dy_mean") : (training ? "bwd" : "bwd_eval");
    compare(label((std::string(mode) + " dx").c_str()), as_double(dx), dxr, 2 * r,
            2 * r + 1e-5 * (1 + std::fabs(offset)));
    if (cf.add) compare(label((std::string(mode) + " dz").c_str()), as_double(dz), dzr, r, 0);
    if (want_param_grads) {
      std::vector<double> e1(C()), e2(C()), z0(C(), 0.0);
      for (u64 c = 0; c < C(); ++c) {
        e1[c] = (dw[c] - dwr[c]) / (1e-5 * std::fabs(dwr[c]) + 1e-6 * dws[c] + 1e-30);
        e2[c] = (db[c] - dbr[c]) / (1e-5 * std::fabs(dbr[c]) + 1e-6 * dbs[c] + 1e-30);
      }
      compare(label((std::string(mode) + " dweight").c_str()), e1, z0, 0, 1);
      compare(label((std::string(mode) + " dbias").c_str()), e2, z0, 0, 1);
    }
  }
};

template <class E>
static void sweep(const char* dt) {
  const Case cases[] = {
      {2, 3, 5, false},   {4, 5, 16, false},  {3, 2, 64, false}, {1, 1, 2, false},  {6, 40, 9, false},
      {2, 7, 24, false},  {5, 3, 1000, false}, {2, 8, 7, true},   {5, 64, 3, true},  {3, 3, 4, true},
      {2, 36, 5, true},   {9, 1, 1, true},    {40, 12, 7, true}, {3, 260, 2, true},
  };
  for (const Case& cs : cases) {
    const int V = cs.rows ? BN_VEC_CL : 16 / (int)sizeof(typename E::T);
    const bool divisible = (cs.rows ? cs.c : cs.s) % V == 0;
    for (int vec = 0; vec <= (divisible ? 1 : 0); ++vec)
      for (int wide = 0; wide <= 1; ++wide)
        for (int variant = 0; variant < 4; ++variant) {
          // variants: (splits, fused, small grid) chosen to cover every path
          Config cf{};
          cf.vec = vec;
          cf.wide = wide;
          cf.relu = variant & 1;
          cf.add = (variant >> 1) & 1;
          const int splits[4] = {1, 1, 3, 5};
          cf.splits = splits[variant];
          cf.fused = variant == 1;
          cf.small_grid = variant == 3 || (variant == 1 && wide);
          Runner<E> r{dt, cs, cf};
          r.rng.seed(1000 * cs.c + 10 * cs.s + variant + 7 * wide);
          // offset data: x = offset + N(mu_c, sd_c), as large as the type resolves
          const double offset = sizeof(typename E::T) == 4 ? 1e4 : (std::string(dt) == "f16" ? 100.0 : 10.0);
          r.forward(variant == 2 ? offset : 0.0);
          r.backward(true, true, 0.0);
          r.backward(false, variant & 1, 0.0);
          if (variant == 0 && vec == 0) r.backward(true, true, offset / 10);
        }
  }
}

// The backward sums with dy of a large common mean on channels of M = 20480 (the CPU
// backend's 4x3x64x80 case): sum g * (x - mean) with f16/bf16 x and an f32 mean rounds
// x - mean the same way for every x of a binade, a bias that sum g multiplies. The
// kernels subtract the mean rounded to the activation type and correct the total in f64.
template <class E>
static void sweep_grad_bias(const char* dt) {
  const Case cases[] = {{4, 3, 5120, false}, {40, 12, 512, true}};
  for (const Case& cs : cases)
    for (int variant = 0; variant < 3; ++variant) {
      Config cf{};
      cf.vec = true;  // both shapes are vector-divisible
      const int splits[3] = {1, 1, 4};
      cf.splits = splits[variant];
      cf.fused = variant == 1;
      Runner<E> r{dt, cs, cf};
      r.rng.seed(77 + variant);
      r.backward(true, true, 0.0, 2.0);
      r.backward(false, true, 0.0, 2.0);
    }
}

// Many splits: a channels-last tile of 128 channels has 8 threads per channel column
// (bdx 32, bdy 8), so 67 splits make each fold thread read one batch of BN_FOLD_BATCH
// slots and then single slots (fold_partials' two loops); channels-first with 2056 splits
// does the same over its 256 threads. Offset data, ReLU and the residual on the forward.
template <class E>
static void sweep_many_splits(const char* dt) {
  const Case cases[] = {{40, 128, 20, true}, {3, 2, 8224, false}};
  const int splits[2] = {67, 2056};
  for (int i = 0; i < 2; ++i)
    for (int vec = 0; vec <= 1; ++vec) {
      Config cf{};
      cf.vec = vec;
      cf.relu = true;
      cf.add = true;
      cf.splits = splits[i];
      Runner<E> r{dt, cases[i], cf};
      r.rng.seed(900 + i + 10 * vec);
      const double offset = sizeof(typename E::T) == 4 ? 1e4 : (std::string(dt) == "f16" ? 100.0 : 10.0);
      r.forward(offset);
      r.backward(true, true, 0.0);
      r.backward(false, false, 0.0);
    }
}

// The persistent kernels: channel (tile) loops with one split, cooperative grids with
// several (every block resident, a grid-wide barrier), register-only and shared-memory
// storage, scalar and vector paths, fusions; and the gradient-bias shapes.
template <class E>
static void sweep_persistent(const char* dt) {
  const Case cases[] = {
      {2, 3, 5, false},  {4, 5, 16, false}, {3, 2, 64, false},  {1, 1, 2, false},  {2, 7, 24, false},
      {5, 3, 1000, false}, {4, 3, 5120, false}, {2, 8, 7, true}, {5, 64, 3, true}, {3, 3, 4, true},
      {9, 1, 1, true},   {40, 12, 7, true}, {3, 260, 2, true},  {40, 12, 512, true},
  };
  for (const Case& cs : cases) {
    const int V = cs.rows ? BN_VEC_CL : 16 / (int)sizeof(typename E::T);
    const bool divisible = (cs.rows ? cs.c : cs.s) % V == 0;
    for (int vec = 0; vec <= (divisible ? 1 : 0); ++vec)
      for (int variant = 0; variant < 4; ++variant) {
        Config cf{};
        cf.persist = true;
        cf.vec = vec;
        cf.relu = variant & 1;
        cf.add = (variant >> 1) & 1;
        const int splits[4] = {1, 3, 1, 2};
        cf.splits = splits[variant];
        cf.small_grid = variant == 2;
        // a cooperative grid runs every block at once here: keep it small
        const u64 items = cs.rows ? (u64)((cs.c + V - 1) / V + 31) / 32 : (u64)cs.c;
        if (cf.splits > 1 && items * cf.splits > 24) cf.splits = 1;
        Runner<E> r{dt, cs, cf};
        r.rng.seed(500 + 1000 * cs.c + 10 * cs.s + variant);
        const double offset = sizeof(typename E::T) == 4 ? 1e4 : (std::string(dt) == "f16" ? 100.0 : 10.0);
        r.forward(variant == 1 ? offset : 0.0);
        r.backward(true, true, 0.0);
        r.backward(false, true, 0.0);
        if (cs.n * cs.s >= 5000) r.backward(true, true, 0.0, 2.0);
      }
  }
}

// Usage: emu_test [f32|f16|bf16 ...]   (default: all three)
int main(int argc, char** argv) {
  std::vector<std::string> which(argv + 1, argv + argc);
  if (which.empty()) which = {"f32", "f16", "bf16"};
  for (const std::string& t : which) {
    if (t == "f32") sweep<F32>("f32"), sweep_grad_bias<F32>("f32"), sweep_many_splits<F32>("f32"), sweep_persistent<F32>("f32");
    else if (t == "f16") sweep<F16>("f16"), sweep_grad_bias<F16>("f16"), sweep_many_splits<F16>("f16"), sweep_persistent<F16>("f16");
    else if (t == "bf16") sweep<BF16>("bf16"), sweep_grad_bias<BF16>("bf16"), sweep_many_splits<BF16>("bf16"), sweep_persistent<BF16>("bf16");
    else {
      std::fprintf(stderr, "unknown dtype %s\n", t.c_str());
      return 2;
    }
  }
  std::printf("%s: %d checks, %d failures\n", which.size() == 1 ? which[0].c_str() : "all", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
