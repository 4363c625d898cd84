// jsdl native CPU kernels (XLA FFI custom calls): the SynthSAEBench sampler of
// jsdl.data.synth.SynthBench (JsdlSynthDraw), and the independent-feature sampler of jsdl.data.Bench
// and StructuredBench (JsdlSparseDraw, at the end), one sample at a time.
//
// The JAX sampler (SynthBench._parts) has to draw fixed shapes: a slot for every child of every
// possibly active parent, a capacity of Poisson arrivals, a capacity of violations, each with its
// random numbers, and XLA's CPU backend evaluates its chains of element-wise ops (ndtri, ndtr) op
// by op over those shapes. Here each sample is drawn by the same algorithm with control flow:
//
//  1. the copula's factor eps [rank] ~ N(0, I) (inverse CDF of uniforms);
//  2. roots [0, R) and the frequent free features [T, Z): P_i = Phi((eps . F_i - t_i) / s_i)
//     (p_i without correlation), one uniform u each: the feature fires with a positive value iff
//     u < P_i Phi(mu_i / sigma_i), and its value is relu(mu_i + sigma_i z), z = -Phi^-1(u / P_i);
//  3. the hierarchy, breadth first from the active roots: the children of an active parent are
//     drawn as in 2; of the competitors (children with a positive value) of an exclusive parent
//     one, chosen uniformly, survives; survivors are scaled by f_parent / mu_parent (rescale) and
//     become parents. Children of inactive parents are never drawn;
//  4. the rare free features [Z, n): candidates are the intervals [H_{i-1}, H_i) of the cumulative
//     hazards H hit by a unit-rate Poisson process (no truncation here), each hit once fires with
//     probability min(1, P_i / q_i); where P_i > q_i (the projection above its margin, checked for
//     every feature of the block) the residual (P_i - q_i) / (1 - q_i) fires independently, and
//     the union fires with probability P_i; a fired feature's magnitude comes from the uniform
//     that fired it;
//  5. mode 0 writes x_p = bias + sum of value * W[col] over the sample's active features, mode 1
//     the dense features [n].
//
// So the draw equals the JAX sampler's in distribution, not in its random stream: the numbers
// come from xoshiro256** seeded per (key, sample index) through SplitMix64, so sample b of a key is
// the same whatever the batch size, two calls with one key (mode 0 and mode 1) draw the same
// samples, and a device drawing rows [offset, offset + B) of a sharded batch draws exactly those
// rows of the whole batch. Math in double precision, outputs float32. Leading axes broadcast (vmap with
// expand_dims): each input's leading axes are 1 or the output's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Rng {  // xoshiro256**, seeded through SplitMix64
  uint64_t s[4];
  explicit Rng(uint64_t seed) {
    for (auto& w : s) w = Mix64(seed += 0x9E3779B97F4A7C15ull);
  }
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t Next() {
    const uint64_t r = Rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = Rotl(s[3], 45);
    return r;
  }
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53; }  // in (0, 1)
};

// Exp(1) variates by the ziggurat method (Marsaglia and Tsang, 2000): 256 layers; from one 64-bit
// word a layer (its low 8 bits) and a 53-bit position (its high bits), accepted at once in ~99% of
// draws; otherwise the wedge test or the tail (7.697... + Exp(1)), so the law is exact.
struct ExpZiggurat {
  uint64_t k[256];
  double w[256], f[256];
  ExpZiggurat() {
    const double m = 9007199254740992.0;  // 2^53
    double de = 7.697117470131487, te = de;
    const double ve = 3.949659822581572e-3, q = ve / std::exp(-de);
    k[0] = static_cast<uint64_t>((de / q) * m);
    k[1] = 0;
    w[0] = q / m;
    w[255] = de / m;
    f[0] = 1.0;
    f[255] = std::exp(-de);
    for (int i = 254; i >= 1; --i) {
      de = -std::log(ve / de + std::exp(-de));
      k[i + 1] = static_cast<uint64_t>((de / te) * m);
      te = de;
      f[i] = std::exp(-de);
      w[i] = de / m;
    }
  }
};
const ExpZiggurat kExpZiggurat;  // built when the library loads

template <typename R>
inline double ExpVariate(R& rng) {
  const ExpZiggurat& z = kExpZiggurat;
  for (;;) {
    const uint64_t r = rng.Next();
    const int i = static_cast<int>(r & 255);
    const uint64_t j = r >> 11;
    const double x = static_cast<double>(j) * z.w[i];
    if (j < z.k[i]) return x;
    if (i == 0) return 7.697117470131487 - std::log(rng.Uniform());
    if (z.f[i] + rng.Uniform() * (z.f[i - 1] - z.f[i]) < std::exp(-x)) return x;
  }
}

// The stream of sample b of a key: a hash of the key's words, mixed with b.
inline uint64_t KeyHash(const uint32_t* kp, int64_t words) {
  uint64_t kh = 0x6A09E667F3BCC908ull;
  for (int64_t w = 0; w < words; ++w) kh = Mix64(kh ^ (kp[w] + 0x9E3779B97F4A7C15ull * (w + 1)));
  return kh;
}
inline uint64_t RowSeed(uint64_t kh, int64_t b) {
  return Mix64(kh ^ Mix64(0xD1B54A32D192ED03ull * static_cast<uint64_t>(b + 1)));
}

inline double Phi(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }

// Phi^-1 on (0, 1): P. J. Acklam's rational approximations (relative error < 1.2e-9, far below
// the float32 outputs' rounding).
inline double Ndtri(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01,  -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  if (p < 0.02425) {
    const double q = std::sqrt(-2.0 * std::log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
           ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  }
  if (p > 1.0 - 0.02425) {
    const double q = std::sqrt(-2.0 * std::log1p(-p));
    return -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
           ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  }
  const double q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
         (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
}

// One input's per-group offset under leading-axis broadcasting.
struct Lead {
  std::vector<int64_t> dims;  // leading dims (1 or the output's)
  int64_t core = 1;           // elements per group
};

struct Tables {
  const float *W, *bias, *probs, *thr, *sd, *mean, *std, *pos, *F, *Ft, *H, *q, *margin;
  const int32_t* children;
  const int32_t* excl;
  const int32_t* guide;  // BuildGuide's table of H, guide_k + 1 entries
  int64_t guide_k;
};

struct Shape {
  int64_t n, d, r, bmax, R, T, Z, m;
  bool rescale;
};

struct Scratch {
  std::vector<double> eps, cval;
  std::vector<float> proj, epsf;  // epsf: eps as float, for the float projections
  std::vector<int32_t> comp, accepted, viol;
  std::vector<std::pair<int32_t, double>> act;  // the sample's (column, value) pairs
  explicit Scratch(const Shape& s)
      : eps(std::max<int64_t>(s.r, 1)), cval(s.bmax), proj(std::max<int64_t>(s.m, 1)), epsf(std::max<int64_t>(s.r, 1)),
        comp(s.bmax) {
    act.reserve(static_cast<size_t>(std::min<int64_t>(s.n, 4096)));
    accepted.reserve(256);
    viol.reserve(256);
  }
};

// Fixed-width float vectors (GCC/Clang vector extensions; 16 lanes where the CPU has AVX-512,
// else 8: the compiler splits them into the registers it has).
constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes)));
inline VecF LoadF(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void StoreF(float* p, const VecF& v) { std::memcpy(p, &v, sizeof v); }
inline bool AnyTrue(const VecI& v) {
  uint64_t w[sizeof(VecI) / 8];
  std::memcpy(w, &v, sizeof v);
  uint64_t o = 0;
  for (uint64_t x : w) o |= x;
  return o != 0;
}

// The guide table of the rare features' cumulative hazards H [m] (float, ascending, H[m - 1] =
// end): guide[k] is the first i with GuideTime(k) < H[i], for k in [0, K]; an arrival at time t
// starts its scan at guide[k] with the largest k whose GuideTime(k) <= t.
inline double GuideTime(int64_t k, int64_t K, double end) { return static_cast<double>(k) * (end / static_cast<double>(K)); }
void BuildGuide(const float* H, int64_t m, std::vector<int32_t>& guide) {
  const int64_t K = std::max<int64_t>(m, 1);
  guide.resize(K + 1);
  const double end = H[m - 1];
  int64_t i = 0;
  for (int64_t k = 0; k <= K; ++k) {
    const double tk = GuideTime(k, K, end);
    while (i < m - 1 && !(tk < H[i])) ++i;
    guide[k] = static_cast<int32_t>(i);
  }
}

// Draws one sample into sc.act (each column at most once).
void DrawSample(const Tables& t, const Shape& s, Rng& rng, Scratch& sc) {
  auto& eps = sc.eps;
  auto& proj = sc.proj;
  auto& accepted = sc.accepted;
  auto& act = sc.act;
  auto& comp = sc.comp;
  auto& cval = sc.cval;
  act.clear();
  for (int64_t j = 0; j < s.r; ++j) eps[j] = Ndtri(rng.Uniform());
  auto given = [&](double pr, int64_t i) { return Phi((pr - t.thr[i]) / t.sd[i]); };
  auto prob = [&](int64_t i) -> double {
    if (s.r == 0) return t.probs[i];
    const float* f = t.F + i * s.r;
    double pr = 0.0;
    for (int64_t j = 0; j < s.r; ++j) pr += eps[j] * f[j];
    return given(pr, i);
  };
  auto value = [&](double u, double p, int64_t i) {
    const double v = t.mean[i] - t.std[i] * Ndtri(u / p);
    return v > 0.0 ? v : 0.0;
  };
  // Fires with a positive value iff u < p Phi(mu / sigma) (see SynthBench._positive_fraction).
  auto draw = [&](int64_t i, double p) {
    const double u = rng.Uniform();
    if (u < p * t.pos[i]) {
      const double v = value(u, p, i);
      if (v > 0.0) act.emplace_back(static_cast<int32_t>(i), v);
    }
  };
  for (int64_t i = 0; i < s.R; ++i) draw(i, prob(i));
  for (int64_t i = s.T; i < s.Z; ++i) draw(i, prob(i));
  // The hierarchy: every active tree node's children (free features have none).
  for (size_t h = 0; h < act.size(); ++h) {
    const int64_t c = act[h].first;
    if (c >= s.T) continue;
    const int32_t* ch = t.children + c * s.bmax;
    int cnt = 0;
    for (int64_t j = 0; j < s.bmax && ch[j] >= 0; ++j) {
      const int64_t i = ch[j];
      const double p = prob(i), u = rng.Uniform();
      if (u < p * t.pos[i]) {
        const double v = value(u, p, i);
        if (v > 0.0) {
          comp[cnt] = static_cast<int32_t>(i);
          cval[cnt++] = v;
        }
      }
    }
    if (!cnt) continue;
    const double factor = s.rescale ? act[h].second / t.mean[c] : 1.0;
    if (t.excl[c] && cnt > 1) {
      const int pick = std::min(cnt - 1, static_cast<int>(rng.Uniform() * cnt));
      act.emplace_back(comp[pick], cval[pick] * factor);
    } else {
      for (int j = 0; j < cnt; ++j) act.emplace_back(comp[j], cval[j] * factor);
    }
  }
  if (s.m == 0) return;
  // The rare free features [Z, n): their projections, kGroup vectors of kLanes features at a
  // time with the sums in registers (summed in the order of a per-feature dot product), and the
  // violations (projection above the margin) listed on the way.
  auto& viol = sc.viol;
  viol.clear();
  if (s.r) {
    float* pr = proj.data();
    float* e = sc.epsf.data();
    for (int64_t j = 0; j < s.r; ++j) e[j] = static_cast<float>(eps[j]);
    constexpr int kGroup = 4;
    int64_t i0 = 0;
    for (; i0 + kGroup * kLanes <= s.m; i0 += kGroup * kLanes) {
      VecF acc[kGroup] = {};
      for (int64_t j = 0; j < s.r; ++j) {
        const VecF ej = VecF{} + e[j];
        const float* row = t.Ft + j * s.m + i0;
        for (int g = 0; g < kGroup; ++g) acc[g] += ej * LoadF(row + g * kLanes);
      }
      VecI hit = {};
      for (int g = 0; g < kGroup; ++g) {
        StoreF(pr + i0 + g * kLanes, acc[g]);
        hit |= acc[g] > LoadF(t.margin + i0 + g * kLanes);
      }
      if (AnyTrue(hit))
        for (int64_t i = i0; i < i0 + kGroup * kLanes; ++i)
          if (pr[i] > t.margin[i]) viol.push_back(static_cast<int32_t>(i));
    }
    for (; i0 < s.m; ++i0) {
      float a = 0.0f;
      for (int64_t j = 0; j < s.r; ++j) a += e[j] * t.Ft[j * s.m + i0];
      pr[i0] = a;
      if (a > t.margin[i0]) viol.push_back(static_cast<int32_t>(i0));
    }
  }
  // The candidates: the features whose interval [H_{i-1}, H_i) holds an arrival of the Poisson
  // process, found from the guide table (t.guide) and a short forward scan.
  accepted.clear();
  const double end = t.H[s.m - 1];
  const int64_t K = t.guide_k;
  double time = 0.0;
  int64_t last = -1;
  for (;;) {
    time += ExpVariate(rng);
    if (time >= end) break;
    int64_t k = std::min<int64_t>(K, static_cast<int64_t>(time * (static_cast<double>(K) / end)));
    while (k > 0 && GuideTime(k, K, end) > time) --k;
    int64_t i = t.guide[k];
    while (!(time < t.H[i])) ++i;  // H[m - 1] = end > time ends the scan
    if (i == last) continue;  // a feature is a candidate once, however many arrivals hit it
    last = i;
    const int64_t col = s.Z + i;
    const double P = s.r ? given(proj[i], col) : t.probs[col];
    const double acc = std::min(1.0, P / t.q[i]);
    const double u = rng.Uniform();
    if (u < acc) {
      accepted.push_back(static_cast<int32_t>(i));
      if (u < acc * t.pos[col]) {
        const double v = value(u, acc, col);
        if (v > 0.0) act.emplace_back(static_cast<int32_t>(col), v);
      }
    }
  }
  for (const int64_t i : viol) {
    const int64_t col = s.Z + i;
    const double r = std::max(given(proj[i], col) - t.q[i], 0.0) / (1.0 - t.q[i]);
    const double u = rng.Uniform();
    if (u >= r || std::find(accepted.begin(), accepted.end(), static_cast<int32_t>(i)) != accepted.end()) continue;
    if (u < r * t.pos[col]) {
      const double v = value(u, r, col);
      if (v > 0.0) act.emplace_back(static_cast<int32_t>(col), v);
    }
  }
}

template <typename T>
ffi::Error LeadOf(const char* name, T& buf, size_t core_rank, const std::vector<int64_t>& out_lead, Lead& lead,
                  const char* kernel = "jsdl_synth_draw") {
  auto dims = buf.dimensions();
  if (dims.size() < core_rank) return ffi::Error::InvalidArgument(std::string(kernel) + ": rank of " + name);
  const size_t nl = dims.size() - core_rank;
  if (nl != 0 && nl != out_lead.size())
    return ffi::Error::InvalidArgument(std::string(kernel) + ": leading axes of " + name);
  lead.dims.assign(out_lead.size(), 1);
  for (size_t a = 0; a < nl; ++a) {
    if (dims[a] != 1 && dims[a] != out_lead[a])
      return ffi::Error::InvalidArgument(std::string(kernel) + ": leading axes of " + name + " do not broadcast");
    lead.dims[a] = dims[a];
  }
  lead.core = 1;
  for (size_t a = nl; a < dims.size(); ++a) lead.core *= dims[a];
  return ffi::Error::Success();
}

int64_t Offset(const Lead& lead, const std::vector<int64_t>& out_lead, int64_t g) {
  int64_t off = 0, stride = lead.core;
  for (size_t a = out_lead.size(); a-- > 0;) {
    const int64_t idx = g % out_lead[a];
    g /= out_lead[a];
    if (lead.dims[a] != 1) off += idx * stride;
    stride *= lead.dims[a];
  }
  return off;
}

ffi::Error SynthDraw(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> bias,
                     ffi::Buffer<ffi::F32> feat, ffi::Buffer<ffi::F32> F, ffi::Buffer<ffi::F32> Ft,
                     ffi::Buffer<ffi::S32> children, ffi::Buffer<ffi::S32> excl, ffi::Buffer<ffi::F32> sparse,
                     ffi::Buffer<ffi::S32> offset, ffi::ResultBuffer<ffi::F32> out, int64_t n_roots, int64_t tree_end, int64_t sparse_start,
                     int64_t rank, int64_t rescale, int64_t mode, int64_t max_threads) {
  auto od = out->dimensions();
  if (od.size() < 2) return ffi::Error::InvalidArgument("jsdl_synth_draw: output rank < 2");
  const std::vector<int64_t> out_lead(od.begin(), od.end() - 2);
  int64_t groups = 1;
  for (int64_t v : out_lead) groups *= v;
  auto wd = W.dimensions(), cd = children.dimensions();
  Shape s;
  s.n = wd[wd.size() - 2];
  s.d = wd[wd.size() - 1];
  s.r = rank;
  s.bmax = cd[cd.size() - 1];
  s.R = n_roots;
  s.T = tree_end;
  s.Z = sparse_start;
  s.m = s.n - s.Z;
  s.rescale = rescale != 0;
  const int64_t B = od[od.size() - 2], C = od[od.size() - 1];
  if (C != (mode == 0 ? s.d : s.n)) return ffi::Error::InvalidArgument("jsdl_synth_draw: output width");
  if (!(0 <= s.R && s.R <= s.T && s.T <= s.Z && s.Z <= s.n) || s.r < 0)
    return ffi::Error::InvalidArgument("jsdl_synth_draw: n_roots <= tree_end <= sparse_start <= n violated");
  Lead lk, lw, lb, lf, lF, lFt, lc, le, ls, lo;
  for (auto e : {LeadOf("key", key, 1, out_lead, lk), LeadOf("W", W, 2, out_lead, lw), LeadOf("bias", bias, 1, out_lead, lb),
                 LeadOf("feat", feat, 2, out_lead, lf), LeadOf("F", F, 2, out_lead, lF), LeadOf("Ft", Ft, 2, out_lead, lFt),
                 LeadOf("children", children, 2, out_lead, lc), LeadOf("exclusive", excl, 1, out_lead, le),
                 LeadOf("sparse", sparse, 2, out_lead, ls), LeadOf("offset", offset, 1, out_lead, lo)})
    if (e.failure()) return e;
  if (lb.core != s.d || lf.core != 6 * s.n || lF.core < s.n * s.r || lc.core != s.n * s.bmax || le.core != s.n ||
      (s.m && lFt.core < s.r * s.m) || ls.core < 3 * s.m || lo.core != 1)
    return ffi::Error::InvalidArgument("jsdl_synth_draw: table shapes disagree with W [n, d]");
  const int64_t chunk = 16, per_group = (B + chunk - 1) / chunk;
  const int64_t threads = jsdl::Threads(pool, max_threads, groups * B * 256);
  // The rare features' guide tables, one per group, built once per call.
  std::vector<std::vector<int32_t>> guides(s.m ? groups : 0);
  for (int64_t g = 0; g < static_cast<int64_t>(guides.size()); ++g)
    BuildGuide(sparse.typed_data() + Offset(ls, out_lead, g), s.m, guides[g]);
  float* op = out->typed_data();
  jsdl::ParallelFor(pool, threads, groups * per_group, [&](int64_t item) {
    const int64_t g = item / per_group, b0 = (item % per_group) * chunk, b1 = std::min(B, b0 + chunk);
    Tables t;
    t.W = W.typed_data() + Offset(lw, out_lead, g);
    t.bias = bias.typed_data() + Offset(lb, out_lead, g);
    const float* f = feat.typed_data() + Offset(lf, out_lead, g);
    t.probs = f;
    t.thr = f + s.n;
    t.sd = f + 2 * s.n;
    t.mean = f + 3 * s.n;
    t.std = f + 4 * s.n;
    t.pos = f + 5 * s.n;
    t.F = F.typed_data() + Offset(lF, out_lead, g);
    t.Ft = Ft.typed_data() + Offset(lFt, out_lead, g);
    const float* sp = sparse.typed_data() + Offset(ls, out_lead, g);
    const int64_t ms = ls.core / 3;
    t.H = sp;
    t.q = sp + ms;
    t.margin = sp + 2 * ms;
    t.children = children.typed_data() + Offset(lc, out_lead, g);
    t.excl = excl.typed_data() + Offset(le, out_lead, g);
    t.guide = s.m ? guides[g].data() : nullptr;
    t.guide_k = s.m ? static_cast<int64_t>(guides[g].size()) - 1 : 0;
    const uint64_t kh = KeyHash(key.typed_data() + Offset(lk, out_lead, g), lk.core);
    const int64_t row0 = offset.typed_data()[Offset(lo, out_lead, g)];  // the batch's first sample index
    Scratch sc(s);
    for (int64_t b = b0; b < b1; ++b) {
      Rng rng(RowSeed(kh, row0 + b));
      DrawSample(t, s, rng, sc);
      float* row = op + (g * B + b) * C;
      if (mode == 0) {
        std::copy(t.bias, t.bias + s.d, row);
        for (const auto& [c, v] : sc.act) {
          const float fv = static_cast<float>(v);
          const float* w = t.W + static_cast<int64_t>(c) * s.d;
          for (int64_t i = 0; i < s.d; ++i) row[i] += fv * w[i];
        }
      } else {
        std::fill(row, row + s.n, 0.0f);
        for (const auto& [c, v] : sc.act) row[c] = static_cast<float>(v);
      }
    }
  });
  return ffi::Error::Success();
}

// The independent-feature sampler of jsdl.data.Bench and of jsdl.data.StructuredBench without a
// copula (jsdl.native.sparse_draw): per sample, the candidates are the successes of n Bernoulli
// (rate_bound) trials, drawn as geometric gaps floor(E / lambda) (E ~ Exp(1) from ExpVariate),
// lambda = -log(1 - rate_bound); with thinning, candidate i is kept with probability rates[i] /
// rate_bound, so it fires on its own with probability rates[i]; every ancestor of a firing
// feature (parent[], at most `depth` levels) fires too. Each distinct firing feature gets one
// magnitude c_min + beta E (E ~ Exp(1), or with magnitude = 1 E ~ U(0, 1)) times importance[i].
// Mode 0 writes x W^T = sum of value * W_rows[i] (in ascending column order), mode 1 the dense
// features. Streams as JsdlSynthDraw (per key and
// sample index); all NaN if some rates[i] > rate_bound under thinning (as the JAX sampler).
ffi::Error SparseDraw(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> rates,
                      ffi::Buffer<ffi::F32> importance, ffi::Buffer<ffi::S32> parent, ffi::Buffer<ffi::S32> offset,
                      ffi::ResultBuffer<ffi::F32> out, double rate_bound, int64_t thin, double c_min, double beta,
                      int64_t magnitude, int64_t depth, int64_t mode, int64_t max_threads) {
  const char* kname = "jsdl_sparse_draw";
  auto od = out->dimensions();
  if (od.size() < 2) return ffi::Error::InvalidArgument("jsdl_sparse_draw: output rank < 2");
  const std::vector<int64_t> out_lead(od.begin(), od.end() - 2);
  int64_t groups = 1;
  for (int64_t v : out_lead) groups *= v;
  auto wd = W.dimensions();
  if (wd.size() < 2) return ffi::Error::InvalidArgument("jsdl_sparse_draw: W_rows rank < 2");
  const int64_t n = wd[wd.size() - 2], m = wd[wd.size() - 1];
  const int64_t B = od[od.size() - 2], C = od[od.size() - 1];
  if (C != (mode == 0 ? m : n)) return ffi::Error::InvalidArgument("jsdl_sparse_draw: output width");
  if (!(rate_bound >= 0.0 && rate_bound <= 1.0) || depth < 0)
    return ffi::Error::InvalidArgument("jsdl_sparse_draw: need 0 <= rate_bound <= 1 and depth >= 0");
  Lead lk, lw, lr, li, lp, lo;
  for (auto e : {LeadOf("key", key, 1, out_lead, lk, kname), LeadOf("W_rows", W, 2, out_lead, lw, kname),
                 LeadOf("rates", rates, 1, out_lead, lr, kname), LeadOf("importance", importance, 1, out_lead, li, kname),
                 LeadOf("parent", parent, 1, out_lead, lp, kname), LeadOf("offset", offset, 1, out_lead, lo, kname)})
    if (e.failure()) return e;
  if (lr.core != n || li.core != n || lp.core != n || lo.core != 1)
    return ffi::Error::InvalidArgument("jsdl_sparse_draw: rates, importance and parent must be [n] for W_rows [n, m]");
  // E / lambda with E ~ Exp(1); rate_bound = 1 fires every candidate (gap 0), 0 none.
  const double inv_lam = rate_bound >= 1.0 ? 0.0 : (rate_bound <= 0.0 ? 0.0 : -1.0 / std::log1p(-rate_bound));
  const int64_t per_row = static_cast<int64_t>(std::ceil(n * rate_bound * (1 + depth))) + 1;
  // A block of rows per work item (at most 512 rows and 1 MiB of output, which stays in cache),
  // accumulated feature by feature (below). Row after row (the first version) read each row's W
  // rows from memory, 3.7x slower at n = 16384, m = 768; slot by slot (the j-th feature of every
  // row, then j + 1) was 1.1-1.3x slower than feature by feature there.
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>(512, (int64_t{1} << 20) / std::max<int64_t>(4 * m, 1)));
  const int64_t per_group = (B + block - 1) / block;
  const int64_t threads = jsdl::Threads(pool, max_threads, groups * B * per_row * (mode == 0 ? std::max<int64_t>(m, 1) : 8));
  float* op = out->typed_data();
  jsdl::ParallelFor(pool, threads, groups * per_group, [&](int64_t item) {
    const int64_t g = item / per_group, b0 = (item % per_group) * block, b1 = std::min(B, b0 + block);
    const float* Wg = W.typed_data() + Offset(lw, out_lead, g);
    const float* rt = rates.typed_data() + Offset(lr, out_lead, g);
    const float* imp = importance.typed_data() + Offset(li, out_lead, g);
    const int32_t* par = parent.typed_data() + Offset(lp, out_lead, g);
    const uint64_t kh = KeyHash(key.typed_data() + Offset(lk, out_lead, g), lk.core);
    const int64_t row0 = offset.typed_data()[Offset(lo, out_lead, g)];
    // Rates are float32: compared with the bound rounded to float32, as the JAX sampler does.
    const float rb = static_cast<float>(rate_bound);
    bool bad = false;
    if (thin)
      for (int64_t i = 0; i < n; ++i) bad |= !(rt[i] <= rb);
    if (bad) {
      std::fill(op + (g * B + b0) * C, op + (g * B + b1) * C, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    std::vector<int64_t> stamp(depth > 0 ? n : 0, -1);  // the last sample that holds feature i
    std::vector<std::pair<int32_t, float>> act;         // the block's (column, value) pairs, row by row
    std::vector<int64_t> start(b1 - b0 + 1, 0);
    act.reserve(static_cast<size_t>(std::min<int64_t>(per_row * 2, n) * (b1 - b0)));
    for (int64_t b = b0; b < b1; ++b) {
      start[b - b0] = static_cast<int64_t>(act.size());
      Rng rng(RowSeed(kh, row0 + b));
      auto mag = [&](int64_t i) {
        const double e = magnitude == 1 ? rng.Uniform() : ExpVariate(rng);
        return static_cast<float>((c_min + beta * e) * imp[i]);
      };
      if (rate_bound > 0.0) {
        for (int64_t pos = -1;;) {
          const double gap = rate_bound >= 1.0 ? 0.0 : std::floor(ExpVariate(rng) * inv_lam);
          if (gap >= static_cast<double>(n - 1 - pos)) break;  // the next success lies past n - 1
          pos += static_cast<int64_t>(gap) + 1;
          if (thin && rt[pos] < rb && rng.Uniform() * rate_bound >= rt[pos]) continue;
          if (depth == 0) {
            act.emplace_back(static_cast<int32_t>(pos), mag(pos));
            continue;
          }
          // The feature and its ancestors, each once per sample (an ancestor already held has
          // its own ancestors held too: depth is the hierarchy's depth).
          int64_t c = pos;
          for (int64_t level = 0; level <= depth && c >= 0 && stamp[c] != b + g * B; ++level) {
            stamp[c] = b + g * B;
            act.emplace_back(static_cast<int32_t>(c), mag(c));
            c = par[c];
          }
        }
      }
    }
    start[b1 - b0] = static_cast<int64_t>(act.size());
    float* rows = op + (g * B + b0) * C;
    std::fill(rows, rows + (b1 - b0) * C, 0.0f);
    if (mode != 0) {
      for (int64_t r = 0; r < b1 - b0; ++r)
        for (int64_t j = start[r]; j < start[r + 1]; ++j) rows[r * C + act[j].first] = act[j].second;
      return;
    }
    // Feature by feature: the block's entries grouped by column (a counting sort; rows ascending
    // within a column), then each used row of W read once and added into every row of the block
    // that holds it. The block's rows stay in cache while W streams past once per block, where a
    // row-major pass would read each row's ~hundreds of W rows again for every sample. Each row
    // sums its features one at a time, in ascending column order.
    const int64_t total = start[b1 - b0];
    std::vector<int32_t> head(n + 1, 0), erow(total);
    std::vector<float> eval(total);
    for (int64_t j = 0; j < total; ++j) ++head[act[j].first + 1];
    for (int64_t c = 0; c < n; ++c) head[c + 1] += head[c];
    {
      std::vector<int32_t> fill(head.begin(), head.end() - 1);
      for (int64_t r = 0; r < b1 - b0; ++r)
        for (int64_t j = start[r]; j < start[r + 1]; ++j) {
          const int32_t q = fill[act[j].first]++;
          erow[q] = static_cast<int32_t>(r);
          eval[q] = act[j].second;
        }
    }
    for (int64_t c = 0; c < n; ++c) {
      const float* w = Wg + c * m;
      for (int32_t q = head[c]; q < head[c + 1]; ++q) {
        float* row = rows + static_cast<int64_t>(erow[q]) * C;
        const float v = eval[q];
        for (int64_t i = 0; i < m; ++i) row[i] += v * w[i];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsdlSynthDraw, SynthDraw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_roots")
                                  .Attr<int64_t>("tree_end")
                                  .Attr<int64_t>("sparse_start")
                                  .Attr<int64_t>("rank")
                                  .Attr<int64_t>("rescale")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsdlSparseDraw, SparseDraw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<double>("rate_bound")
                                  .Attr<int64_t>("thin")
                                  .Attr<double>("c_min")
                                  .Attr<double>("beta")
                                  .Attr<int64_t>("magnitude")
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("max_threads"));
