// jaxaccel CPU attention for encoders: bidirectional softmax attention within segments.
//
//   out[b, t, n, :] = sum_j softmax_j(scale * q[b, t, n, :] . k[b, j, h(n), :]) v[b, j, h(n), :]
//
// over the keys j with segments[b, j] == segments[b, t] != 0, where h(n) = n / (N / KH) (grouped
// query heads share a KV head). Padding queries (segment 0) get zeros.
//
// Why: on CPU, XLA computes BERT-shaped attention (32 rows of 64 tokens, 12 heads of 32) as 384
// small batched matmuls with layout transposes around them, far below the CPU's peak, and scores every
// (query, key) pair of a row, the masked ones too; when several texts share a row (packing)
// most pairs are masked. This kernel reads q, k, v in the projections' [B, T, heads, H] layout
// and scores only the pairs inside a segment, so a row's cost is the sum of its texts' squared
// lengths, not the row's.
//
// Work: one task per (row, segment), longest first, shared by the calling thread and
// XLA's intra-op pool threads (parallel.h). Each task copies its segment's keys (transposed)
// and values into a small buffer, then for each query: scores across keys, max, exp, sum, and
// the probability-weighted sum of values, for blocks of 8 queries (block_product).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && !defined(JAXACCEL_GENERIC)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "softmax.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;     // float32 lanes of one AVX-512 register

constexpr int64_t kBlock = 8;  // queries scored together (8 independent sums hide the FMA latency)

// out[r, :cols] = sum_{i < n} a[r, i] * b[i, :cols] for the kBlock rows r (row-major with strides
// lda, ldb, ldo): the two small GEMMs of a block of queries, scores = (scaled q) . k^T and
// outputs = p . v. AVX-512 FMA blocks when cols is a multiple of 16, else loops GCC vectorizes.
void block_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, float* __restrict out,
                   int64_t ldo, int64_t cols) {
#if defined(__AVX512F__) && !defined(JAXACCEL_GENERIC)
  if (cols % kLanes == 0) {
    for (int64_t c = 0; c < cols; c += kLanes) {
      __m512 acc[kBlock];
      for (int r = 0; r < kBlock; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m512 bv = _mm512_loadu_ps(b + i * ldb + c);
        for (int r = 0; r < kBlock; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + i]), bv, acc[r]);
      }
      for (int r = 0; r < kBlock; ++r) _mm512_storeu_ps(out + r * ldo + c, acc[r]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < kBlock; ++r) {
    float* __restrict o = out + r * ldo;
    std::fill(o, o + cols, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float ai = a[r * lda + i];
      const float* bi = b + i * ldb;
      for (int64_t c = 0; c < cols; ++c) o[c] += ai * bi[c];
    }
  }
}

// Row s[:Lp] of scores (keys past L are padding) -> unnormalized probabilities; returns 1 / sum,
// NaN when a score is NaN or +inf (as XLA's softmax gives), so the query's output is NaN.
float softmax_row(float* __restrict s, int64_t L, int64_t Lp) {
  std::fill(s + L, s + Lp, -INFINITY);
  float lanes[kLanes];
  std::copy(s, s + kLanes, lanes);
  for (int64_t j = kLanes; j < Lp; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = lanes[l] > s[j + l] ? lanes[l] : s[j + l];
  const float top = *std::max_element(lanes, lanes + kLanes);
  for (int64_t j = 0; j < Lp; ++j) s[j] = jaxaccel::exp_nonpositive(s[j] - top);
  std::fill(s + L, s + Lp, 0.0f);
  std::fill(lanes, lanes + kLanes, 0.0f);
  for (int64_t j = 0; j < Lp; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += s[j + l];
  float total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return 1.0f / total;
}

// Rows of q, k, v and out are H floats strided by the heads, which the hardware prefetchers do
// not follow: each task first asks for all of its rows into L2, then each head for the rows it
// reads next into L1 (together a large gain on short texts; `python -m bench.encoder`).
constexpr int64_t kAhead = 8;  // positions
template <int Write = 0, int Locality = 3>
inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(p + i, Write, Locality);
}

struct Task {
  int64_t b, start, len;  // row, offset of the segment's positions in `order`, length
  int64_t kv0, kv1;       // KV heads [kv0, kv1)
};

struct SegmentAttention {
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  float* out = nullptr;
  const int32_t* order = nullptr;  // per row: its non-padding positions, grouped by segment
  int64_t T = 0, N = 0, KH = 0, H = 0;
  float scale = 1.0f;
  std::vector<Task> tasks;

  void operator()(int64_t c) const {
    const Task& t = tasks[c];
    const int32_t* pos = order + t.b * T + t.start;
    const int64_t G = N / KH;
    for (int64_t j = 0; j < t.len; ++j) {  // the task's rows, into L2
      const int64_t at = t.b * T + pos[j];
      prefetch<0, 2>(q + (at * N + t.kv0 * G) * H, (t.kv1 - t.kv0) * G * H);
      prefetch<0, 2>(k + (at * KH + t.kv0) * H, (t.kv1 - t.kv0) * H);
      prefetch<0, 2>(v + (at * KH + t.kv0) * H, (t.kv1 - t.kv0) * H);
    }
    for (int64_t kv = t.kv0; kv < t.kv1; ++kv) head(t, kv);
  }

  // One KV head (and its G query heads) over one segment.
  void head(const Task& t, int64_t kv_head) const {
    const int64_t L = t.len, Lp = (L + kLanes - 1) / kLanes * kLanes, G = N / KH;
    thread_local std::vector<float> buf;
    buf.resize(size_t(H * Lp + L * H + kBlock * (Lp + 2 * H)));
    float* kt = buf.data();          // [H, Lp]: the segment's keys, transposed
    float* vs = kt + H * Lp;         // [L, H]: its values
    float* S = vs + L * H;           // [kBlock, Lp]: a block of queries' scores, then probabilities
    float* qs = S + kBlock * Lp;     // [kBlock, H]: the block's queries, times scale
    float* o = qs + kBlock * H;      // [kBlock, H]: the block's outputs
    const int32_t* pos = order + t.b * T + t.start;
    auto kv_row = [&](int64_t j) { return (t.b * T + pos[j]) * KH + kv_head; };
    auto q_row = [&](int64_t i, int64_t n) { return ((t.b * T + pos[i]) * N + n) * H; };
    for (int64_t j = 0; j < L + kAhead; ++j) {
      if (j < L) {  // row j into L1, kAhead rows before it is copied
        prefetch(k + kv_row(j) * H, H);
        prefetch(v + kv_row(j) * H, H);
      }
      const int64_t c = j - kAhead;
      if (c < 0) continue;
      const float* kr = k + kv_row(c) * H;
      for (int64_t h = 0; h < H; ++h) kt[h * Lp + c] = kr[h];
      std::memcpy(vs + c * H, v + kv_row(c) * H, sizeof(float) * H);
    }
    for (int64_t h = 0; h < H; ++h) std::fill(kt + h * Lp + L, kt + (h + 1) * Lp, 0.0f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kv_head * G + g;
      for (int64_t i0 = 0; i0 < L; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, L - i0);
        for (int64_t r = 0; r < rows; ++r) prefetch<1>(out + q_row(i0 + r, n), H);  // written below
        for (int64_t r = i0 + kBlock; r < std::min(L, i0 + 2 * kBlock); ++r) prefetch(q + q_row(r, n), H);  // next block
        std::fill(qs, qs + kBlock * H, 0.0f);
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = q + q_row(i0 + r, n);
          for (int64_t h = 0; h < H; ++h) qs[r * H + h] = qr[h] * scale;
        }
        block_product(qs, H, kt, Lp, H, S, Lp, Lp);  // scores [kBlock, Lp]
        float inv[kBlock];
        for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_row(S + r * Lp, L, Lp);
        for (int64_t r = rows; r < kBlock; ++r) std::fill(S + r * Lp, S + (r + 1) * Lp, 0.0f);
        block_product(S, Lp, vs, H, L, o, H, H);  // outputs [kBlock, H]
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = out + q_row(i0 + r, n);
          for (int64_t h = 0; h < H; ++h) dst[h] = o[r * H + h] * inv[r];
        }
      }
    }
  }
};

using Heads = ffi::Buffer<ffi::F32, 4>;  // float32 [B, T, heads, H]
using HeadsOut = ffi::ResultBuffer<ffi::F32, 4>;
using Segments = ffi::Buffer<ffi::S32, 2>;  // int32 [B, T]

ffi::Error Attend(ffi::ThreadPool pool, Heads q, Heads k, Heads v, Segments segments, HeadsOut out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = segments.dimensions();
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3], KH = kd[2];
  if (kd[0] != B || kd[1] != T || kd[3] != H || KH < 1 || N % KH != 0 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || sd[0] != B || sd[1] != T ||
      !std::equal(qd.begin(), qd.end(), out->dimensions().begin()))
    return ffi::Error::InvalidArgument(
        "jaxaccel attention: q must be [B, T, N, H], k and v [B, T, KH, H] with KH dividing N, "
        "segments [B, T], out like q");
  SegmentAttention job;
  job.q = q.typed_data(); job.k = k.typed_data(); job.v = v.typed_data(); job.out = out->typed_data();
  job.T = T; job.N = N; job.KH = KH; job.H = H; job.scale = scale;
  std::vector<int32_t> order(size_t(B * T));
  const int32_t* seg = segments.typed_data();
  for (int64_t b = 0; b < B; ++b) {
    int32_t* row = order.data() + b * T;
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (seg[b * T + t] != 0) row[count++] = int32_t(t);
      else std::fill(job.out + (b * T + t) * N * H, job.out + (b * T + t + 1) * N * H, 0.0f);
    }
    const int32_t* sb = seg + b * T;  // group by segment id, keeping position order within one
    std::stable_sort(row, row + count, [sb](int32_t x, int32_t y) { return sb[x] < sb[y]; });
    for (int64_t start = 0; start < count;) {
      int64_t end = start + 1;
      while (end < count && sb[row[end]] == sb[row[start]]) ++end;
      job.tasks.push_back({b, start, end - start, 0, KH});
      start = end;
    }
  }
  // A task takes all KV heads of a segment (its rows of q, k, v and out are read and written
  // whole, which the caches like; one head per task measured slower on short segments),
  // unless that leaves too few tasks to share among threads: then heads are split.
  const int64_t workers = std::min<int64_t>(pool.num_threads(), jaxaccel::kMaxHelpers + 1);
  const int64_t splits = std::min<int64_t>(KH, (4 * workers + int64_t(job.tasks.size()) - 1) /
                                                   std::max<int64_t>(1, int64_t(job.tasks.size())));
  std::stable_sort(job.tasks.begin(), job.tasks.end(), [](const Task& x, const Task& y) { return x.len > y.len; });
  if (splits > 1) {
    std::vector<Task> split;
    for (const Task& t : job.tasks)
      for (int64_t i = 0; i < splits; ++i) split.push_back({t.b, t.start, t.len, KH * i / splits, KH * (i + 1) / splits});
    job.tasks.swap(split);
  }
  job.order = order.data();
  int64_t pairs = 0;  // (query, key, head) triples: a small call is not worth a hand-off
  for (const Task& t : job.tasks) pairs += t.len * t.len * (t.kv1 - t.kv0) * (N / KH);
  jaxaccel::parallel_for(pool, int64_t(job.tasks.size()), pairs * H < (1 << 16) ? 0 : workers - 1, job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelSegmentAttention, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Heads>()
                                  .Arg<Heads>()
                                  .Arg<Heads>()
                                  .Arg<Segments>()
                                  .Ret<Heads>()
                                  .Attr<float>("scale"));
