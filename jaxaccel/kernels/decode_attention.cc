// jaxaccel CPU attention for the generation programs (KernelChoice.decode): queries against the
// KV cache, one per row in a decode step, T per row in a prefill (or a speculative check).
//
//   out[b, t, n, :] = sum_s softmax_s(c(scale * q[b, t, n, :] . k[b, s, h(n), :])) v[b, s, h(n), :]
//
// over the cache slots s in [i - window + 1, i] (all s <= i without a window) with i =
// index[b] + t, the query's own slot; c = softcap * tanh(. / softcap) when softcap > 0. The cache
// is read in its stored [B, S, KH, H] layout (float32 or bfloat16) and only up to each query's
// slot; XLA transposed each layer's cache to [B, KH, S, H] every step and scored every
// preallocated slot (masked). A slot outside [0, S) is clamped to it first (the engine never
// passes one). With round_probs the probabilities are rounded to bfloat16 before the values are
// summed, as a bfloat16 model's XLA attention does.
//
// Work: one task per (query row, KV head), its G = N / KH query heads together, so each key and
// value row is read once per query; with fewer tasks than threads (a decode step at batch 1 of a
// model with one KV head) each task's slots are split into parts as well (RunDecode). The
// products are SIMD loops with several independent sums (decode_scores, decode_values) on
// AVX-512 and AVX2 builds.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "softmax.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // float32 lanes the portable dot sums in (vectorized by GCC)

// ---- the two products, the G query heads of one KV head against its cache rows: scores[g, s] =
// q[g] . key[s] and out[g] = sum_s p[g, s] value[s], keys / values float32 or bfloat16 rows
// `stride` apart. Scores take four key rows per query head at once (one sum per dot was bound by
// the FMA latency); values take four value rows at once, front to back, so each output vector is
// loaded and stored once per four rows (once per row was bound by those loads and stores).
#if defined(__AVX512F__) && !defined(JAXACCEL_GENERIC)
using Vec = __m512;
constexpr int64_t kW = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline void vstore(float* p, Vec x) { _mm512_storeu_ps(p, x); }
#define JAXACCEL_DECODE_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(JAXACCEL_GENERIC)
using Vec = __m256;
constexpr int64_t kW = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline void vstore(float* p, Vec x) { _mm256_storeu_ps(p, x); }
#define JAXACCEL_DECODE_SIMD 1
#endif

#ifdef JAXACCEL_DECODE_SIMD
template <int R, typename T>  // out[r] = qn . row r, for R rows `stride` apart
inline void dot_rows(const float* qn, const T* kr, int64_t stride, int64_t H, float* out) {
  Vec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vzero();
  int64_t i = 0;
  for (; i + kW <= H; i += kW) {
    const Vec qv = vload(qn + i);
    for (int r = 0; r < R; ++r) acc[r] = vfma(qv, vload(kr + r * stride + i), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float x = jaxaccel::hsum(acc[r]);
    for (int64_t j = i; j < H; ++j) x += qn[j] * jaxaccel::widen(kr[r * stride + j]);
    out[r] = x;
  }
}

template <typename T>
void decode_scores(const float* qb, const T* k0, int64_t stride, int64_t H, int64_t G, int64_t s0, int64_t s1,
                   float* p, int64_t ld) {
  constexpr int R = 4;
  int64_t s = s0;
  for (; s + R <= s1; s += R)
    for (int64_t g = 0; g < G; ++g) {
      float x[R];
      dot_rows<R>(qb + g * H, k0 + s * stride, stride, H, x);
      for (int r = 0; r < R; ++r) p[g * ld + s + r] = x[r];
    }
  for (; s < s1; ++s)
    for (int64_t g = 0; g < G; ++g) dot_rows<1>(qb + g * H, k0 + s * stride, stride, H, p + g * ld + s);
}

template <typename T>
void decode_values(const T* v0, int64_t stride, int64_t H, int64_t G, int64_t s0, int64_t s1, const float* p,
                   int64_t ld, float* o) {
  std::fill(o, o + G * H, 0.0f);
  const int64_t cols = H / kW * kW;
  int64_t s = s0;
  for (; s + 4 <= s1; s += 4) {
    const T *r0 = v0 + s * stride, *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = p + g * ld + s;
      const Vec p0 = vset(pg[0]), p1 = vset(pg[1]), p2 = vset(pg[2]), p3 = vset(pg[3]);
      float* og = o + g * H;
      for (int64_t i = 0; i < cols; i += kW) {
        Vec acc = vfma(p0, vload(r0 + i), vload(og + i));
        acc = vfma(p1, vload(r1 + i), acc);
        acc = vfma(p2, vload(r2 + i), acc);
        vstore(og + i, vfma(p3, vload(r3 + i), acc));
      }
      for (int64_t i = cols; i < H; ++i)
        og[i] += pg[0] * jaxaccel::widen(r0[i]) + pg[1] * jaxaccel::widen(r1[i]) +
                 pg[2] * jaxaccel::widen(r2[i]) + pg[3] * jaxaccel::widen(r3[i]);
    }
  }
  for (; s < s1; ++s) {
    const T* vr = v0 + s * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float ps = p[g * ld + s];
      float* og = o + g * H;
      for (int64_t i = 0; i < cols; i += kW) vstore(og + i, vfma(vset(ps), vload(vr + i), vload(og + i)));
      for (int64_t i = cols; i < H; ++i) og[i] += ps * jaxaccel::widen(vr[i]);
    }
  }
}
#else
template <typename T>
void decode_scores(const float* qb, const T* k0, int64_t stride, int64_t H, int64_t G, int64_t s0, int64_t s1,
                   float* p, int64_t ld) {
  for (int64_t s = s0; s < s1; ++s)
    for (int64_t g = 0; g < G; ++g) {
      const float* qn = qb + g * H;
      const T* kr = k0 + s * stride;
      float lanes[kLanes] = {0}, tail = 0;
      int64_t i = 0;
      for (; i + kLanes <= H; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += qn[i + l] * jaxaccel::widen(kr[i + l]);
      for (; i < H; ++i) tail += qn[i] * jaxaccel::widen(kr[i]);
      for (int64_t l = 0; l < kLanes; ++l) tail += lanes[l];
      p[g * ld + s] = tail;
    }
}

template <typename T>
void decode_values(const T* v0, int64_t stride, int64_t H, int64_t G, int64_t s0, int64_t s1, const float* p,
                   int64_t ld, float* o) {
  std::fill(o, o + G * H, 0.0f);
  for (int64_t s = s0; s < s1; ++s) {  // each value row read once for the G heads
    const T* vr = v0 + s * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float ps = p[g * ld + s];
      float* __restrict og = o + g * H;
      for (int64_t i = 0; i < H; ++i) og[i] += ps * jaxaccel::widen(vr[i]);
    }
  }
}
#endif

// One query per row against the KV cache as stored; one task per (row, KV head), or, split
// (RunDecode), parts of a task's slots: the scores of each part, then one softmax per query head
// over all slots (the same probabilities as unsplit), then each part's probability-weighted
// values, summed part by part.
template <typename T>
struct DecodeAttention {
  const float* q = nullptr;  // [B, TQ, N, H]: query rows row = b * TQ + t
  const T *k = nullptr, *v = nullptr;  // [B, S, KH, H]
  const int32_t* index = nullptr;  // [B]: the slot of each row's first query
  float* out = nullptr;  // [B, TQ, N, H]
  int64_t TQ = 1, S = 0, N = 0, KH = 0, H = 0, window = 0;
  float scale = 1, softcap = 0;
  bool round_probs = false;

  int64_t G() const { return N / KH; }
  // the attended slots [first, first + L) of query row `row` (query t of batch row b sits at slot
  // index[b] + t and attends to it and the slots before it)
  void range(int64_t row, int64_t& first, int64_t& L) const {
    const int64_t last = std::min<int64_t>(std::max<int64_t>(index[row / TQ] + row % TQ, 0), S - 1);
    first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
    L = last - first + 1;
  }
  // scores p[g * ld + s] for the slots s in [s0, s1) (relative to `first`) of task bk = row * KH + kh
  void score(int64_t bk, int64_t first, int64_t s0, int64_t s1, float* p, int64_t ld) const {
    const int64_t row = bk / KH, kh = bk % KH, b = row / TQ;
    const T* k0 = k + ((b * S + first) * KH + kh) * H;
    decode_scores(q + (row * N + kh * G()) * H, k0, KH * H, H, G(), s0, s1, p, ld);
    if (scale != 1.0f || softcap > 0)
      for (int64_t g = 0; g < G(); ++g)
        for (int64_t s = s0; s < s1; ++s) {
          float x = p[g * ld + s] * scale;
          if (softcap > 0) x = std::tanh(x / softcap) * softcap;
          p[g * ld + s] = x;
        }
  }
  // scores -> probabilities in place, per query head over its L slots; bad[g]: a NaN / +inf score
  // (its output becomes NaN, as XLA's softmax gives)
  void softmax(float* p, int64_t ld, int64_t L, char* bad) const {
    for (int64_t g = 0; g < G(); ++g) {
      float* pg = p + g * ld;
      float top = -INFINITY;
      for (int64_t s = 0; s < L; ++s) top = std::isnan(pg[s]) || pg[s] > top ? pg[s] : top;
      bad[g] = std::isnan(top) || top == INFINITY;
      float total = 0;
      for (int64_t s = 0; s < L; ++s) total += pg[s] = jaxaccel::exp_nonpositive(pg[s] - top);
      const float inv = 1.0f / total;
      for (int64_t s = 0; s < L; ++s) pg[s] = round_probs ? jaxaccel::round_bf16(pg[s] * inv) : pg[s] * inv;
    }
  }
  // o[g * H + i] = sum over the slots s in [s0, s1) of p[g * ld + s] * v[slot s]
  void values(int64_t bk, int64_t first, int64_t s0, int64_t s1, const float* p, int64_t ld, float* o) const {
    const int64_t kh = bk % KH, b = bk / KH / TQ;
    decode_values(v + ((b * S + first) * KH + kh) * H, KH * H, H, G(), s0, s1, p, ld, o);
  }
  void poison(int64_t bk, const char* bad) const {
    float* ob = out + bk * G() * H;
    for (int64_t g = 0; g < G(); ++g)
      if (bad[g]) std::fill(ob + g * H, ob + (g + 1) * H, NAN);
  }

  // the whole of task bk on one thread
  void operator()(int64_t bk) const {
    int64_t first, L;
    range(bk / KH, first, L);
    std::vector<float> p(size_t(G() * L));  // scores, then probabilities [G, L]
    std::vector<char> bad(size_t(G()), 0);
    score(bk, first, 0, L, p.data(), L);
    softmax(p.data(), L, L, bad.data());
    values(bk, first, 0, L, p.data(), L, out + bk * G() * H);
    poison(bk, bad.data());
  }
};

using Query = ffi::Buffer<ffi::F32, 4>;  // float32 [B, T, N, H]
using QueryOut = ffi::ResultBuffer<ffi::F32, 4>;
using Index = ffi::Buffer<ffi::S32, 1>;

constexpr int64_t kMinPartSlots = 64;  // a part of fewer slots costs more in hand-offs than it saves

template <typename T>
ffi::Error RunDecode(ffi::ThreadPool& pool, DecodeAttention<T> job, int64_t rows) {
  const int64_t span = std::min<int64_t>(job.S, job.window > 0 ? job.window : job.S);
  const int64_t work = rows * job.N * job.H * span;
  const int64_t workers = work < (1 << 17) ? 1 : std::min<int64_t>(pool.num_threads(), jaxaccel::kMaxHelpers + 1);
  const int64_t tasks = rows * job.KH;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((workers + tasks - 1) / tasks, span / kMinPartSlots));
  if (parts == 1) {
    jaxaccel::parallel_for(pool, tasks, workers - 1, job);
    return ffi::Error::Success();
  }
  // few tasks, long caches: split each task's slots into `parts`
  const int64_t G = job.G(), GH = G * job.H;
  std::vector<int64_t> first(static_cast<size_t>(tasks)), L(static_cast<size_t>(tasks));
  for (int64_t bk = 0; bk < tasks; ++bk) job.range(bk / job.KH, first[bk], L[bk]);
  std::vector<float> p(size_t(tasks * G * span));  // [task, G, span]
  std::vector<float> partial(size_t(tasks * parts * GH));  // [task, part, G, H]
  std::vector<char> bad(size_t(tasks * G), 0);
  auto part = [&](int64_t t, int64_t& bk, int64_t& s0, int64_t& s1) {
    bk = t / parts;
    const int64_t c = t % parts;
    s0 = L[bk] * c / parts;
    s1 = L[bk] * (c + 1) / parts;
  };
  jaxaccel::parallel_for(pool, tasks * parts, workers - 1, [&](int64_t t) {
    int64_t bk, s0, s1;
    part(t, bk, s0, s1);
    job.score(bk, first[bk], s0, s1, p.data() + bk * G * span, span);
  });
  for (int64_t bk = 0; bk < tasks; ++bk) job.softmax(p.data() + bk * G * span, span, L[bk], bad.data() + bk * G);
  jaxaccel::parallel_for(pool, tasks * parts, workers - 1, [&](int64_t t) {
    int64_t bk, s0, s1;
    part(t, bk, s0, s1);
    job.values(bk, first[bk], s0, s1, p.data() + bk * G * span, span, partial.data() + t * GH);
  });
  for (int64_t bk = 0; bk < tasks; ++bk) {
    float* ob = job.out + bk * GH;
    std::copy(partial.data() + bk * parts * GH, partial.data() + (bk * parts + 1) * GH, ob);
    for (int64_t c = 1; c < parts; ++c) {
      const float* pc = partial.data() + (bk * parts + c) * GH;
      for (int64_t i = 0; i < GH; ++i) ob[i] += pc[i];
    }
    job.poison(bk, bad.data() + bk * G);
  }
  return ffi::Error::Success();
}

ffi::Error AttendDecode(ffi::ThreadPool pool, Query q, ffi::AnyBuffer k, ffi::AnyBuffer v, Index index,
                        QueryOut out, float scale, int64_t window, float softcap, bool round_probs) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const int64_t B = qd[0], TQ = qd[1], N = qd[2], H = qd[3];
  if (kd.size() != 4 || kd[0] != B || kd[3] != H || kd[2] < 1 || N % kd[2] != 0 || kd[1] < 1 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || k.element_type() != v.element_type() ||
      index.dimensions()[0] != B || !std::equal(qd.begin(), qd.end(), out->dimensions().begin()))
    return ffi::Error::InvalidArgument(
        "jaxaccel decode attention: q must be [B, T, N, H], k and v [B, S, KH, H] with KH dividing N, "
        "index [B], out like q");
  auto fill = [&](auto& job) {
    job.q = q.typed_data(); job.index = index.typed_data(); job.out = out->typed_data();
    job.TQ = TQ; job.S = kd[1]; job.N = N; job.KH = kd[2]; job.H = H; job.window = window;
    job.scale = scale; job.softcap = softcap; job.round_probs = round_probs;
  };
  switch (k.element_type()) {
    case ffi::DataType::F32: {
      DecodeAttention<float> job;
      fill(job);
      job.k = static_cast<const float*>(k.untyped_data()); job.v = static_cast<const float*>(v.untyped_data());
      return RunDecode(pool, job, B * TQ);
    }
    case ffi::DataType::BF16: {
      DecodeAttention<uint16_t> job;
      fill(job);
      job.k = static_cast<const uint16_t*>(k.untyped_data()); job.v = static_cast<const uint16_t*>(v.untyped_data());
      return RunDecode(pool, job, B * TQ);
    }
    default:
      return ffi::Error::InvalidArgument("jaxaccel decode attention: the cache must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelDecodeAttention, AttendDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Query>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Index>()
                                  .Ret<Query>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("round_probs"));
