// jsdl native CPU kernels (XLA FFI custom calls): the sparse kernels' scatter-add of rows, the
// decoder backward's row dot products, and the dense step's count of non-zero codes per latent.
//
//   out[g, c] = sum over entries (b, j) with cols[g, b, j] = c of vals[g, b, j] * src[g, r, :],
//   r = rows[g, b, j] (BatchTopK) or b (TopK),
//
// the backward of jsdl.kernels' gathers (dW_E and dW_D^T) and, with samples as the targets, the
// decode. XLA's CPU scatter-add, run once per
// slot j in a loop, reads and writes the whole [n, m] accumulator k times and writes each slot's
// products out first. Here the entries are counting-sorted by latent once, then every latent's
// row is summed in place, in the order of XLA's loop (slot j ascending, then b ascending) with
// the roundings of XLA's loop: a product rounded before its sum where XLA scatters (`fused = 0`;
// the library is built with -ffp-contract=off), one fused multiply-add where XLA's loop adds the
// products into its accumulator in one fusion (`fused = 1`, the TopK decode). So the result is the
// same to the bit; latents are spread over XLA's intra-op threads. Leading axes (vmap) are groups.
// Latent indices follow JAX's .at[c].add: a negative one counts from the end, one still outside
// [0, n) is dropped.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error ScatterRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::F32> src,
                       ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                       int64_t has_rows, int64_t fused, int64_t max_threads) {
  auto vd = vals.dimensions(), sd = src.dimensions(), cd = cols.dimensions(), od = out->dimensions();
  const size_t lead = vd.size();
  if (lead < 2 || sd.size() != lead || cd.size() != lead || od.size() != lead)
    return ffi::Error::InvalidArgument("jsdl_scatter_rows: vals, src, cols and out need the same rank >= 2");
  int64_t groups = 1;
  for (size_t d = 0; d + 2 < lead; ++d) {
    if (sd[d] != vd[d] || cd[d] != vd[d] || od[d] != vd[d])
      return ffi::Error::InvalidArgument("jsdl_scatter_rows: leading axes differ");
    groups *= vd[d];
  }
  const int64_t B = vd[lead - 2], k = vd[lead - 1], S = sd[lead - 2], m = sd[lead - 1], n = od[lead - 2];
  if (cd[lead - 2] != B || cd[lead - 1] != k || od[lead - 1] != m)
    return ffi::Error::InvalidArgument("jsdl_scatter_rows: shapes of vals, cols, src and out disagree");
  if (!has_rows && S != B) return ffi::Error::InvalidArgument("jsdl_scatter_rows: without rows, src needs B rows");
  if (has_rows && rows.dimensions().size() != lead)
    return ffi::Error::InvalidArgument("jsdl_scatter_rows: rows must have the shape of cols");
  const float* vp = vals.typed_data();
  const float* sp = src.typed_data();
  const int32_t* cp = cols.typed_data();
  const int32_t* rp = has_rows ? rows.typed_data() : nullptr;
  float* op = out->typed_data();
  const int64_t E = B * k;

  // Counting sort of each group's entries by latent, stable in XLA's loop order (j, then b).
  std::vector<int64_t> offsets(static_cast<size_t>(groups * (n + 1)), 0);
  std::vector<int32_t> order(static_cast<size_t>(groups * E));
  const int64_t threads = jsdl::Threads(pool, max_threads, groups * E * m);
  jsdl::ParallelFor(pool, std::min(threads, groups), groups, [&](int64_t g) {
    const int32_t* cg = cp + g * E;
    // JAX's .at[c].add: a negative index counts from the end, an index still outside is dropped.
    auto latent = [&](int64_t e) -> int64_t {
      const int64_t c = cg[e] < 0 ? cg[e] + n : cg[e];
      return c >= 0 && c < n ? c : -1;
    };
    int64_t* off = offsets.data() + g * (n + 1);
    int32_t* ord = order.data() + g * E;
    for (int64_t e = 0; e < E; ++e)
      if (latent(e) >= 0) ++off[latent(e) + 1];
    for (int64_t i = 0; i < n; ++i) off[i + 1] += off[i];
    std::vector<int64_t> pos(off, off + n);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t e = b * k + j, c = latent(e);
        if (c >= 0) ord[pos[c]++] = static_cast<int32_t>(e);
      }
  });

  // Every latent's row: zero, then the entries' products added in order.
  const int64_t chunk = std::max<int64_t>(16, n / (16 * threads));
  const int64_t per_group = (n + chunk - 1) / chunk;
  jsdl::ParallelFor(pool, threads, groups * per_group, [&](int64_t item) {
    const int64_t g = item / per_group, c0 = (item % per_group) * chunk, c1 = std::min(n, c0 + chunk);
    const int64_t* off = offsets.data() + g * (n + 1);
    const int32_t* ord = order.data() + g * E;
    const float* v = vp + g * E;
    const float* s = sp + g * S * m;
    const int32_t* r = rp ? rp + g * E : nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = op + (g * n + c) * m;
      std::fill(acc, acc + m, 0.0f);
      for (int64_t p = off[c]; p < off[c + 1]; ++p) {
        const int64_t e = ord[p];
        const int64_t row = r ? r[e] : e / k;
        if (row < 0 || row >= S) continue;
        const float w = v[e];
        const float* x = s + row * m;
        if (fused) {
          for (int64_t i = 0; i < m; ++i) acc[i] = __builtin_fmaf(w, x[i], acc[i]);
        } else {
          for (int64_t i = 0; i < m; ++i) {
            const float prod = w * x[i];
            acc[i] = acc[i] + prod;
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// out[g, b, j] = <u[g, r, :], W[g, cols[g, b, j], :]>, r = rows[g, b, j] (BatchTopK) or b (TopK): the
// sparse decoder's backward for the codes. Sixteen partial sums per dot (vectorised without
// reassociating a loop), so it equals XLA's reduction to rounding, not to the bit. Entries whose
// latent or row is out of range get 0.
ffi::Error GatherDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> W,
                     ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                     int64_t has_rows, int64_t max_threads) {
  auto ud = u.dimensions(), wd = W.dimensions(), cd = cols.dimensions();
  const size_t lead = cd.size();
  if (lead < 2 || ud.size() != lead || wd.size() != lead)
    return ffi::Error::InvalidArgument("jsdl_gather_dot: u, W and cols need the same rank >= 2");
  int64_t groups = 1;
  for (size_t d = 0; d + 2 < lead; ++d) {
    if (ud[d] != cd[d] || wd[d] != cd[d]) return ffi::Error::InvalidArgument("jsdl_gather_dot: leading axes differ");
    groups *= cd[d];
  }
  const int64_t B = cd[lead - 2], k = cd[lead - 1], S = ud[lead - 2], m = ud[lead - 1], n = wd[lead - 2];
  if (wd[lead - 1] != m) return ffi::Error::InvalidArgument("jsdl_gather_dot: u and W rows differ in length");
  if (!has_rows && S != B) return ffi::Error::InvalidArgument("jsdl_gather_dot: without rows, u needs B rows");
  const float* up = u.typed_data();
  const float* wp = W.typed_data();
  const int32_t* cp = cols.typed_data();
  const int32_t* rp = has_rows ? rows.typed_data() : nullptr;
  float* op = out->typed_data();
  const int64_t threads = jsdl::Threads(pool, max_threads, groups * B * k * m);
  const int64_t chunk = std::max<int64_t>(8, B / (16 * threads));
  const int64_t per_group = (B + chunk - 1) / chunk;
  jsdl::ParallelFor(pool, threads, groups * per_group, [&](int64_t item) {
    const int64_t g = item / per_group, b0 = (item % per_group) * chunk, b1 = std::min(B, b0 + chunk);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = (g * B + b) * k + j;
        const int64_t c = cp[e], r = rp ? rp[e] : b;
        if (c < 0 || c >= n || r < 0 || r >= S) {
          op[e] = 0.0f;
          continue;
        }
        const float* x = up + (g * S + r) * m;
        const float* w = wp + (g * n + c) * m;
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= m; i += 16)
          for (int l = 0; l < 16; ++l) part[l] += x[i + l] * w[i + l];
        float sum = 0.0f;
        for (int l = 0; l < 16; ++l) sum += part[l];
        for (; i < m; ++i) sum += x[i] * w[i];
        op[e] = sum;
      }
  });
  return ffi::Error::Success();
}

// How many rows of each column are non-zero: x [..., B, n] -> out [..., n] int32 (NaN counts, -0
// does not: `x != 0`). The dense step's fired counts: XLA wrote a float32 mask of x out and summed it
// with a product; this reads x once. Rows are split over the threads, each counting into its own
// row of partial sums (exact: integers), added up at the end.
ffi::Error ColumnNonzero(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out,
                         int64_t max_threads) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("jsdl_column_nonzero: operand rank < 2");
  const int64_t n = dims[dims.size() - 1], B = dims[dims.size() - 2];
  int64_t groups = 1;
  for (size_t d = 0; d + 2 < dims.size(); ++d) groups *= dims[d];
  if (B > INT32_MAX) return ffi::Error::InvalidArgument("jsdl_column_nonzero: more than 2^31 - 1 rows");
  int32_t* op = out->typed_data();
  if (groups * n == 0) return ffi::Error::Success();
  const int64_t threads = jsdl::Threads(pool, max_threads, groups * B * n);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, B));
  std::vector<int32_t> partial(static_cast<size_t>(groups * parts * n), 0);
  const float* xp = x.typed_data();
  jsdl::ParallelFor(pool, threads, groups * parts, [&](int64_t item) {
    const int64_t g = item / parts, t = item % parts;
    const int64_t r0 = B * t / parts, r1 = B * (t + 1) / parts;
    int32_t* c = partial.data() + item * n;
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + (g * B + r) * n;
      for (int64_t j = 0; j < n; ++j) c[j] += row[j] != 0.0f;
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    int32_t* o = op + g * n;
    std::copy(partial.begin() + g * parts * n, partial.begin() + (g * parts + 1) * n, o);
    for (int64_t t = 1; t < parts; ++t) {
      const int32_t* c = partial.data() + (g * parts + t) * n;
      for (int64_t j = 0; j < n; ++j) o[j] += c[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsdlColumnNonzero, ColumnNonzero,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsdlScatterRows, ScatterRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_rows")
                                  .Attr<int64_t>("fused")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsdlGatherDot, GatherDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_rows")
                                  .Attr<int64_t>("max_threads"));
