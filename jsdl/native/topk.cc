// jsdl native CPU kernel: exact top-k indices along the last axis (an XLA FFI custom call).
//
// Same result as jax.lax.top_k on CPU: entries ordered by value descending in IEEE total order
// (+NaN first, -NaN last, +0 before -0), ties to the lower index. One pass over each row keeps a
// threshold (the k-th largest key among the candidates so far) and a SIMD compare skips blocks
// with no entry above it. For k <= 64 the candidates are kept sorted by insertion (rows of at most
// 4096 entries first take a floor from their block maxima); for larger k the entries above the
// threshold are appended to a buffer of 2k + 64 candidates that is cut back to k
// (std::nth_element) when full. Rows are spread over XLA's intra-op thread pool; few long rows (a
// flat BatchTopK selection) are cut into segments whose candidates are merged.
//
// Built and loaded by jsdl/native/__init__.py; see docs/api/native.md.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Cand {
  int32_t key;
  int32_t idx;
};

inline bool Before(const Cand& a, const Cand& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

// A float's bits as an int32 whose signed order is IEEE total order.
inline int32_t KeyOf(int32_t b) { return b ^ ((b >> 31) & 0x7fffffff); }

// Offers the entries of row[i, hi) to offer(index, key) in index order, skipping every entry whose
// key is at or below threshold(all) when its block is read (all = true: the whole block is
// offered). offer re-checks each entry against the current state. AVX-512, AVX2 or portable code,
// as the compiler targets (JSDL_NATIVE_CXXFLAGS can force the narrower ones; tests do).
template <typename Threshold, typename Offer>
inline void Scan(const int32_t* row, int64_t i, int64_t hi, Threshold threshold, Offer offer) {
#if defined(__AVX512F__)
  const __m512i low31 = _mm512_set1_epi32(0x7fffffff);
  for (; i + 16 <= hi; i += 16) {
    bool all;
    const int32_t thr = threshold(all);
    __m512i b = _mm512_loadu_si512(reinterpret_cast<const void*>(row + i));
    __m512i key = _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), low31));
    uint32_t mask = all ? 0xffffu : _mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(thr));
    while (mask) {
      int j = __builtin_ctz(mask);
      mask &= mask - 1;
      offer(i + j, KeyOf(row[i + j]));
    }
  }
#elif defined(__AVX2__)
  const __m256i low31 = _mm256_set1_epi32(0x7fffffff);
  for (; i + 8 <= hi; i += 8) {
    bool all;
    const int32_t thr = threshold(all);
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
    __m256i key = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), low31));
    __m256i gt = _mm256_cmpgt_epi32(key, _mm256_set1_epi32(thr));
    uint32_t mask = all ? 0xffu : static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(gt)));
    while (mask) {
      int j = __builtin_ctz(mask);
      mask &= mask - 1;
      offer(i + j, KeyOf(row[i + j]));
    }
  }
#else
  for (; i + 16 <= hi; i += 16) {
    bool all;
    const int32_t thr = threshold(all);
    int32_t mx = INT32_MIN;
    for (int j = 0; j < 16; ++j) mx = std::max(mx, KeyOf(row[i + j]));
    if (all || mx > thr)
      for (int j = 0; j < 16; ++j) offer(i + j, KeyOf(row[i + j]));
  }
#endif
  for (; i < hi; ++i) offer(i, KeyOf(row[i]));
}

// Small k: the candidates kept sorted (insertion), so the threshold is always the current k-th
// largest and the fewest entries pass it. Large k: a buffer cut back by nth_element (below).
constexpr int64_t kSortedMaxK = 64;
constexpr int64_t kFloorMaxBlocks = 256;

void SortedTopK(const int32_t* row, int64_t lo, int64_t hi, int64_t k, Cand* out) {
  int64_t m = 0;
  auto insert = [&](int64_t i, int32_t key) {
    // i is larger than every kept index, so it goes after the kept entries with an equal key.
    int64_t p = m < k ? m++ : k - 1;
    while (p > 0 && out[p - 1].key < key) {
      out[p] = out[p - 1];
      --p;
    }
    out[p] = {key, static_cast<int32_t>(i)};
  };
  // A floor first, for rows of 2k to 256 blocks of 16: the k-th largest block maximum. At least k
  // entries reach it, so an entry below it is not among the k largest. It keeps the entries that
  // pass while the k slots fill (and their mispredicted branches) few: 20% faster on [., 512]
  // rows, k 8; on rows of 16384 the second pass over the row cost more (40% slower).
  const int64_t nb = (hi - lo) / 16;
  int32_t floor_key = INT32_MIN;
  if (nb >= 2 * k && nb <= kFloorMaxBlocks) {
    thread_local std::vector<int32_t> maxima;
    maxima.resize(nb);
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t* blk = row + lo + 16 * b;
      int32_t mx = INT32_MIN;
      for (int l = 0; l < 16; ++l) mx = std::max(mx, KeyOf(blk[l]));
      maxima[b] = mx;
    }
    std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<int32_t>());
    floor_key = maxima[k - 1];
  }
  auto offer = [&](int64_t j, int32_t key) {
    if (m < k ? key >= floor_key : key > out[k - 1].key) insert(j, key);
  };
  // Entries a block's mask lets through: key > thr, or every entry while k slots are free and no
  // floor is set (thr would be INT32_MIN - 1).
  auto threshold = [&](bool& all) -> int32_t {
    if (m < k) {
      all = floor_key == INT32_MIN;
      return all ? INT32_MIN : floor_key - 1;
    }
    all = false;
    return out[k - 1].key;
  };
  Scan(row, lo, hi, threshold, offer);
}

// Top-k of row[lo, hi) (hi - lo >= k), indices relative to the row; the k candidates, sorted.
void SegmentTopK(const int32_t* row, int64_t lo, int64_t hi, int64_t k, std::vector<Cand>& buf,
                 Cand* out) {
  if (k <= kSortedMaxK) return SortedTopK(row, lo, hi, k, out);
  const size_t cap = static_cast<size_t>(2 * k + 64);
  buf.clear();
  buf.reserve(cap);
  int32_t t = INT32_MAX;
  for (int64_t i = lo; i < lo + k; ++i) {
    int32_t key = KeyOf(row[i]);
    buf.push_back({key, static_cast<int32_t>(i)});
    t = std::min(t, key);
  }
  auto compact = [&]() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), Before);
    buf.resize(k);
    t = buf[k - 1].key;
  };
  auto offer = [&](int64_t i, int32_t key) {
    if (key > t) {
      buf.push_back({key, static_cast<int32_t>(i)});
      if (buf.size() == cap) compact();
    }
  };
  Scan(row, lo + k, hi, [&](bool& all) { all = false; return t; }, offer);
  if (buf.size() > static_cast<size_t>(k)) compact();
  std::sort(buf.begin(), buf.end(), Before);
  std::copy(buf.begin(), buf.begin() + k, out);
}

// Large k of a long row (a flat BatchTopK selection): the threshold is estimated first, from a
// strided sample of about 256 n / k entries (its quantile at 1.1 k / n plus three standard
// deviations, so about 1.3 k entries pass), then one SIMD pass over the row, in parts spread over
// the threads, collects every entry above it, and the k largest of those are the k largest of the
// row, exactly, provided at least k passed. Returns false when fewer did (an unlucky or adversarial
// sample): the caller then selects as before. The buffer path cuts its candidates back with
// nth_element again and again while its threshold climbs, and merges segments single-threaded.
constexpr int64_t kSampledMinK = 1024;

bool SampledTopK(ffi::ThreadPool& pool, int64_t threads, const int32_t* row, int64_t n, int64_t k, Cand* out) {
  const int64_t stride = std::max<int64_t>(1, k / 256);
  const int64_t S = n / stride;
  const double f = static_cast<double>(k) / static_cast<double>(n);
  const int64_t q = std::min<int64_t>(S, static_cast<int64_t>(1.1 * f * S + 3.0 * std::sqrt(f * S)) + 1);
  std::vector<int32_t> sample(static_cast<size_t>(S));
  for (int64_t i = 0; i < S; ++i) sample[i] = KeyOf(row[i * stride]);
  std::nth_element(sample.begin(), sample.begin() + (q - 1), sample.end(), std::greater<int32_t>());
  const int32_t t = sample[q - 1];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(4 * threads, n / 4096));
  const int64_t len = (n + parts - 1) / parts;
  std::vector<std::vector<Cand>> found(static_cast<size_t>(parts));
  jsdl::ParallelFor(pool, std::min(threads, parts), parts, [&](int64_t p) {
    const int64_t lo = p * len, hi = std::min(n, lo + len);
    auto& v = found[p];
    v.reserve(static_cast<size_t>(1.5 * f * (hi - lo)) + 64);
    Scan(row, lo, hi, [t](bool& all) { all = false; return t; }, [&](int64_t i, int32_t key) {
      if (key > t) v.push_back({key, static_cast<int32_t>(i)});
    });
  });
  size_t total = 0;
  for (const auto& v : found) total += v.size();
  if (total < static_cast<size_t>(k)) return false;
  std::vector<Cand> all;
  all.reserve(total);
  for (const auto& v : found) all.insert(all.end(), v.begin(), v.end());
  std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), Before);
  std::sort(all.begin(), all.begin() + k, Before);
  std::copy(all.begin(), all.begin() + k, out);
  return true;
}

ffi::Error TopKIndices(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::ResultBuffer<ffi::S32> idx,
                       int64_t k, int64_t max_threads) {
  auto dims = z.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("jsdl_top_k: operand must have rank >= 1");
  const int64_t n = dims.back();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < dims.size(); ++d) rows *= dims[d];
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("jsdl_top_k: need 1 <= k <= n");
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("jsdl_top_k: rows longer than 2^31 - 1");
  if (rows == 0) return ffi::Error::Success();
  const int32_t* zp = reinterpret_cast<const int32_t*>(z.typed_data());
  int32_t* ip = idx->typed_data();

  const int64_t threads = jsdl::Threads(pool, max_threads, rows * n);
  // Large k of few long rows: a sampled threshold, exact or declined (SampledTopK).
  std::vector<bool> done(static_cast<size_t>(rows), false);
  bool all_done = false;
  if (k >= kSampledMinK && n >= 8 * k && rows < 2 * threads) {
    std::vector<Cand> out(static_cast<size_t>(k));
    all_done = true;
    for (int64_t r = 0; r < rows; ++r) {
      done[r] = SampledTopK(pool, threads, zp + r * n, n, k, out.data());
      if (done[r])
        for (int64_t j = 0; j < k; ++j) ip[r * k + j] = out[j].idx;
      all_done = all_done && done[r];
    }
  }
  if (all_done) return ffi::Error::Success();
  // Few long rows: cut each row into segments of at least max(4k, 2^14) entries.
  int64_t segments = 1;
  if (rows < 2 * threads) {
    int64_t seg_min = std::max<int64_t>(4 * k, int64_t{1} << 14);
    segments = std::max<int64_t>(1, std::min<int64_t>((2 * threads + rows - 1) / rows, n / seg_min));
  }
  if (segments == 1) {
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, rows / (8 * threads)));
    const int64_t items = (rows + chunk - 1) / chunk;
    const std::vector<bool>* skip = &done;
    jsdl::ParallelFor(pool, threads, items, [=](int64_t item) {
      std::vector<Cand> buf;
      std::vector<Cand> out(k);
      for (int64_t r = item * chunk; r < std::min(rows, (item + 1) * chunk); ++r) {
        if ((*skip)[r]) continue;
        SegmentTopK(zp + r * n, 0, n, k, buf, out.data());
        for (int64_t j = 0; j < k; ++j) ip[r * k + j] = out[j].idx;
      }
    });
    return ffi::Error::Success();
  }
  std::vector<Cand> cands(static_cast<size_t>(rows * segments * k));
  const int64_t seg_len = n / segments;
  jsdl::ParallelFor(pool, threads, rows * segments, [&](int64_t item) {
    const int64_t r = item / segments, s = item % segments;
    if (done[r]) return;
    const int64_t lo = s * seg_len, hi = s + 1 == segments ? n : lo + seg_len;
    std::vector<Cand> buf;
    SegmentTopK(zp + r * n, lo, hi, k, buf, cands.data() + item * k);
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (done[r]) continue;
    auto first = cands.begin() + r * segments * k, last = first + segments * k;
    std::nth_element(first, first + (k - 1), last, Before);
    std::sort(first, first + k, Before);
    for (int64_t j = 0; j < k; ++j) ip[r * k + j] = first[j].idx;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsdlTopKIndices, TopKIndices,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("max_threads"));
