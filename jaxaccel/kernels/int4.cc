// jaxaccel CPU matmul for int4 weights: y[M, N] = x[M, K] . W, decode rows (M <= 8) and the
// prefill's rows (up to 512: a blocked GEMM, see "the prefill" below), with W stored as
// quant_math stores int4: codes q in [0, 15], two per byte (the even input in the low
// nibble), [N, K / 2] bytes, and a scale and a zero per group of K / G inputs ([N, G] each):
// W[n, k] = q[n, k] * scale[n, g] + zero[n, g].
//
// Why: XLA unpacks and dequantizes every int4 weight to float32 in each call, so int4 decoded
// several times slower than int8 although it reads half the bytes, and its prefill cost twice
// int8's. This kernel reads the packed bytes as stored and widens the nibbles in registers.
//
// How (decode): y[m, n] = sum_g scale[n, g] * sum_{k in g} q[n, k] x[m, k]  +  zero[n, g] * xsum[m, g],
// with xsum[m, g] = sum_{k in g} x[m, k] (float, once per call). The first sum multiplies in
// integers: x is rounded per block of 64 inputs, to int16 on AVX-512 VNNI and the portable build
// (within 2^-16 of the block's largest |x|, as the int8 kernel does; the codes, zero-extended to
// int16, meet it in vpdpwssd) and to int8 on AVX2 (the codes meet it as bytes in vpmaddubsw; why:
// at the AVX2 kernels below). The 32 bytes of a block hold its even inputs in their low
// nibbles and its odd ones in their high nibbles, so x is stored permuted per block, even inputs
// first: the low nibbles then meet x's first 32 values and the high nibbles its last 32, and the
// weights need no shuffle. The int32 lanes of a block's first and second 32 inputs stay apart, so
// each takes its own group's scale (groups of 32 inputs or any multiple of it).
// Overflow: an int32 lane sums at most 4 products of 15 * 32767 (int16 x) or 8 of 15 * 127 (int8).
//
// Threads: rows of W are cut into chunks shared by the calling thread and XLA's pool (parallel.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if (defined(__AVX512F__) || defined(__AVX2__)) && !defined(JAXACCEL_GENERIC)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;      // inputs per int16 block of x (32 bytes of codes)
constexpr int64_t kMaxRows = 8;     // decode rows (kernels.MAX_ROWS)
constexpr int64_t kRowGroup = 4;    // rows of x multiplied together against one weight row
constexpr int64_t kAheadBytes = 10240;  // how far ahead the weight rows are prefetched

// x's block of 64 inputs rounded to T (int16, or int8 for the AVX2 decode rows) in input order:
// q[k] = round(x[k] / s) with s = max |x| / L, L = T's largest value, returned (0 for an all-zero
// block; NaN, with q all 0, for a block holding a NaN or infinity: the scale then makes the row's
// outputs NaN). The decode and prefill paths both round through here.
template <typename T>
inline float round_block(const float* xb, T* q) {
  constexpr float L = float(std::numeric_limits<T>::max());
  float top = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < kBlock; ++k) {
    finite &= std::isfinite(xb[k]);
    top = std::max(top, std::fabs(xb[k]));
  }
  const float sc = finite ? top / L : std::numeric_limits<float>::quiet_NaN();
  const bool ok = finite && sc > 0.0f;
  for (int64_t k = 0; k < kBlock; ++k)  // clamped: a subnormal scale can round past L
    q[k] = ok ? T(std::min(L, std::max(-L, std::nearbyint(xb[k] / sc)))) : T(0);
  return sc;
}

// sum[g * stride] = the sum of row xm's inputs in group g (G groups of K / G inputs)
inline void group_sums(const float* xm, int64_t K, int64_t G, float* sum, int64_t stride) {
  const int64_t gs = K / G;
  for (int64_t g = 0; g < G; ++g) {
    float t = 0.0f;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) t += xm[k];
    sum[g * stride] = t;
  }
}

// x [M, K] prepared for one decode call: codes (T: int16, or int8 on AVX2) permuted per block,
// their scales, group sums.
template <typename T>
struct PreparedX {
  std::vector<T> q;         // [M, K]: block b holds x's even inputs of the block, then its odd ones
  std::vector<float> s;     // [M, K / kBlock]
  std::vector<float> sum;   // [M, G]
  int64_t K = 0, G = 0;

  void prepare(const float* x, int64_t M, int64_t K_, int64_t G_) {
    K = K_, G = G_;
    const int64_t nb = K / kBlock;
    q.assign(size_t(M * K), 0);
    s.assign(size_t(M * nb), 0.0f);
    sum.assign(size_t(M * G), 0.0f);
    T qb[kBlock];
    for (int64_t m = 0; m < M; ++m) {
      group_sums(x + m * K, K, G, sum.data() + m * G, 1);
      for (int64_t b = 0; b < nb; ++b) {
        s[m * nb + b] = round_block(x + m * K + b * kBlock, qb);
        for (int64_t k = 0; k < kBlock; ++k) q[m * K + b * kBlock + (k & 1) * (kBlock / 2) + k / 2] = qb[k];
      }
    }
  }
};

inline void prefetch_ahead(const uint8_t* row, int64_t bytes, int64_t n, int64_t N) {
  const int64_t rows_ahead = std::max<int64_t>(1, kAheadBytes / bytes);
  const char* ahead = reinterpret_cast<const char*>(row + rows_ahead * bytes);
  if (n + rows_ahead < N)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
}

// the zero term of output (m, n): sum_g zero[n, g] * xsum[m, g]
inline float zero_term(const float* zero_row, const float* xsum_row, int64_t G) {
  float t = 0.0f;
  for (int64_t g = 0; g < G; ++g) t += zero_row[g] * xsum_row[g];
  return t;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_INT4_PATH 2
using jaxaccel::hsum;
using DecodeX = PreparedX<int16_t>;

// M rows of x (from xq's row m0) against weight row n: one 32-byte load of codes per block, its
// low and high nibbles zero-extended to 32 int16 lanes each, two vpdpwssd per row of x.
template <int M>
void row_kernel(const DecodeX& xq, int64_t m0, const uint8_t* w, const float* scale, const float* zero,
                float* y, int64_t N, int64_t n) {
  const int64_t K = xq.K, G = xq.G, nb = K / kBlock, gs = K / G, bytes = K / 2;
  const uint8_t* row = w + n * bytes;
  prefetch_ahead(row, bytes, n, N);
  const float* sw = scale + n * G;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i p = _mm256_loadu_si256((const __m256i*)(row + b * (kBlock / 2)));
    const __m512i lo = _mm512_cvtepu8_epi16(_mm256_and_si256(p, low4));
    const __m512i hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 4), low4));
    const float sa = sw[b * kBlock / gs], sb = sw[(b * kBlock + kBlock / 2) / gs];
    for (int m = 0; m < M; ++m) {
      const int16_t* xv = xq.q.data() + (m0 + m) * K + b * kBlock;
      __m512i t = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void*)xv));
      t = _mm512_dpwssd_epi32(t, hi, _mm512_loadu_si512((const void*)(xv + kBlock / 2)));
      // int32 lanes 0-7: the block's first 32 inputs (scale sa), lanes 8-15: its last 32 (sb)
      const float xs = xq.s[(m0 + m) * nb + b];
      const __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sa * xs), _mm512_set1_ps(sb * xs));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    y[(m0 + m) * N + n] = hsum(acc[m]) + zero_term(zero + n * G, xq.sum.data() + (m0 + m) * G, G);
}

// One row of x against S weight rows (decode at batch 1): the rows come from S far-apart places
// of the thread's chunk, so S read streams are in flight (see `rows`), and the zero terms are
// summed in vectors into the same accumulator, leaving one horizontal sum per output.
template <int S>
void stream_kernel(const DecodeX& xq, const uint8_t* w, const float* scale, const float* zero, float* y,
                   int64_t N, const int64_t* rows) {
  const int64_t K = xq.K, G = xq.G, nb = K / kBlock, gs = K / G, bytes = K / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m512 acc[S];
  for (int i = 0; i < S; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {  // the zero terms: zero[n, g] * xsum[g]
    const __mmask16 mask = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1);
    const __m512 xsum = _mm512_maskz_loadu_ps(mask, xq.sum.data() + g);
    for (int i = 0; i < S; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, zero + rows[i] * G + g), xsum, acc[i]);
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int16_t* xv = xq.q.data() + b * kBlock;
    const __m512i xa = _mm512_loadu_si512((const void*)xv), xb = _mm512_loadu_si512((const void*)(xv + kBlock / 2));
    const float xs = xq.s[b];
    const int64_t ga = b * kBlock / gs, gb = (b * kBlock + kBlock / 2) / gs;
    for (int i = 0; i < S; ++i) {
      const __m256i p = _mm256_loadu_si256((const __m256i*)(w + rows[i] * bytes + b * (kBlock / 2)));
      const __m512i lo = _mm512_cvtepu8_epi16(_mm256_and_si256(p, low4));
      const __m512i hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(p, 4), low4));
      __m512i t = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, xa);
      t = _mm512_dpwssd_epi32(t, hi, xb);
      const float* sw = scale + rows[i] * G;
      const __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sw[ga] * xs), _mm512_set1_ps(sw[gb] * xs));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[i]);
    }
  }
  for (int i = 0; i < S; ++i) y[rows[i]] = hsum(acc[i]);
}
#define JAXACCEL_INT4_STREAMS 4
#elif defined(__AVX2__) && defined(__FMA__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_INT4_PATH 1
using jaxaccel::hsum;
// Decode rows on AVX2 round x to int8 per block (s = max |x| / 127), not int16: the codes are
// unsigned bytes, so vpmaddubsw multiplies 32 code-x pairs per instruction with no widening of
// the nibbles, where int16 x needed four vpmovzxbw and four vpmaddwd per block. That halves the
// vector work per weight byte, and without AVX-512 that work, not memory, bounded int4 decode.
// The rounding error (half a step of 1/127 of the block's largest |x|) is far below the int4
// weights' own (16 levels per group); tests/test_kernels.py bounds it. VNNI and the portable build
// keep int16, and the prefill tiles (more than kMaxRows rows) round to int16 on every build.
using DecodeX = PreparedX<int8_t>;

// A block's 64 products, code (unsigned) times x (signed): byte j of lo / hi holds the code of
// input 2j / 2j + 1, xe / xo the matching x. Pairs of products sum to int16 (at most 2 * 15 * 127
// per pair and 4 of them per lane), and vpmaddwd by 1 adds neighbours into int32: lanes 0-3 hold
// the block's first 32 inputs, lanes 4-7 its last 32.
inline __m256i block_dot(__m256i lo, __m256i hi, __m256i xe, __m256i xo) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The weight scales of a block's first and second 32 inputs (lanes 0-3, 4-7) times x's block scale.
inline __m256 half_scales(const float* sw, int64_t ga, int64_t gb, __m256 xs) {
  return _mm256_mul_ps(_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(sw[ga])), _mm_set1_ps(sw[gb]), 1), xs);
}

// M rows of x against weight row n: the nibbles are split once per block for all M rows.
template <int M>
void row_kernel(const DecodeX& xq, int64_t m0, const uint8_t* w, const float* scale, const float* zero,
                float* y, int64_t N, int64_t n) {
  const int64_t K = xq.K, G = xq.G, nb = K / kBlock, gs = K / G, bytes = K / 2;
  const uint8_t* row = w + n * bytes;
  prefetch_ahead(row, bytes, n, N);
  const float* sw = scale + n * G;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i p = _mm256_loadu_si256((const __m256i*)(row + b * (kBlock / 2)));
    const __m256i lo = _mm256_and_si256(p, low4), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
    const int64_t ga = b * kBlock / gs, gb = (b * kBlock + kBlock / 2) / gs;
    for (int m = 0; m < M; ++m) {
      const int8_t* xv = xq.q.data() + (m0 + m) * K + b * kBlock;
      const __m256i t = block_dot(lo, hi, _mm256_loadu_si256((const __m256i*)xv),
                                  _mm256_loadu_si256((const __m256i*)(xv + kBlock / 2)));
      const __m256 sc = half_scales(sw, ga, gb, _mm256_set1_ps(xq.s[(m0 + m) * nb + b]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    y[(m0 + m) * N + n] = hsum(acc[m]) + zero_term(zero + n * G, xq.sum.data() + (m0 + m) * G, G);
}

// As the AVX-512 stream_kernel: one row of x against S far-apart weight rows.
template <int S>
void stream_kernel(const DecodeX& xq, const uint8_t* w, const float* scale, const float* zero, float* y,
                   int64_t N, const int64_t* rows) {
  const int64_t K = xq.K, G = xq.G, nb = K / kBlock, gs = K / G, bytes = K / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[S];
  float tail[S];
  for (int i = 0; i < S; ++i) acc[i] = _mm256_setzero_ps(), tail[i] = 0.0f;
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {  // the zero terms: zero[n, g] * xsum[g]
    const __m256 xsum = _mm256_loadu_ps(xq.sum.data() + g);
    for (int i = 0; i < S; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(zero + rows[i] * G + g), xsum, acc[i]);
  }
  for (; g < G; ++g)
    for (int i = 0; i < S; ++i) tail[i] += zero[rows[i] * G + g] * xq.sum[g];
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xv = xq.q.data() + b * kBlock;
    const __m256i xe = _mm256_loadu_si256((const __m256i*)xv), xo = _mm256_loadu_si256((const __m256i*)(xv + 32));
    const __m256 xs = _mm256_set1_ps(xq.s[b]);
    const int64_t ga = b * kBlock / gs, gb = (b * kBlock + kBlock / 2) / gs;
    for (int i = 0; i < S; ++i) {
      const __m256i p = _mm256_loadu_si256((const __m256i*)(w + rows[i] * bytes + b * (kBlock / 2)));
      const __m256i t = block_dot(_mm256_and_si256(p, low4), _mm256_and_si256(_mm256_srli_epi16(p, 4), low4), xe, xo);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), half_scales(scale + rows[i] * G, ga, gb, xs), acc[i]);
    }
  }
  for (int i = 0; i < S; ++i) y[rows[i]] = hsum(acc[i]) + tail[i];
}
#define JAXACCEL_INT4_STREAMS 4
#else
#define JAXACCEL_INT4_PATH 0
using DecodeX = PreparedX<int16_t>;
// Portable: the same integer sums, one code at a time (x's permuted int16 layout undone by index).
template <int M>
void row_kernel(const DecodeX& xq, int64_t m0, const uint8_t* w, const float* scale, const float* zero,
                float* y, int64_t N, int64_t n) {
  const int64_t K = xq.K, G = xq.G, nb = K / kBlock, gs = K / G, bytes = K / 2;
  const uint8_t* row = w + n * bytes;
  for (int m = 0; m < M; ++m) {
    const int16_t* xv = xq.q.data() + (m0 + m) * K;
    float total = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t half[2] = {0, 0};  // the block's first and second 32 inputs
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        const uint8_t byte = row[b * (kBlock / 2) + j];
        half[j / 16] += int32_t(byte & 0x0F) * xv[b * kBlock + j] + int32_t(byte >> 4) * xv[b * kBlock + kBlock / 2 + j];
      }
      const float xs = xq.s[(m0 + m) * nb + b];
      total += float(half[0]) * (scale[n * G + b * kBlock / gs] * xs) +
               float(half[1]) * (scale[n * G + (b * kBlock + kBlock / 2) / gs] * xs);
    }
    y[(m0 + m) * N + n] = total + zero_term(zero + n * G, xq.sum.data() + (m0 + m) * G, G);
  }
}
#endif

void rows(const DecodeX& xq, int64_t M, const uint8_t* w, const float* scale, const float* zero, float* y,
          int64_t N, int64_t n0, int64_t n1) {
#ifdef JAXACCEL_INT4_STREAMS
  if (M == 1) {  // S streams over S equal parts of [n0, n1); measured faster than one prefetched row at a time
    n0 = jaxaccel::stream_rows<JAXACCEL_INT4_STREAMS>(n0, n1, [&](const int64_t* r) {
      stream_kernel<JAXACCEL_INT4_STREAMS>(xq, w, scale, zero, y, N, r);
    });
  }
#endif
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += kRowGroup) switch (std::min(kRowGroup, M - m0)) {
        case 1: row_kernel<1>(xq, m0, w, scale, zero, y, N, n); break;
        case 2: row_kernel<2>(xq, m0, w, scale, zero, y, N, n); break;
        case 3: row_kernel<3>(xq, m0, w, scale, zero, y, N, n); break;
        default: row_kernel<4>(xq, m0, w, scale, zero, y, N, n); break;
      }
}

// --- the prefill: many rows of x (up to kPrefillMaxRows), a blocked GEMM on the int16 paths ---
//
// Why: the decode kernel unpacks a weight row's nibbles again for every 4 rows of x and sums
// each output across vector lanes; for the prefill's hundreds of rows that work, not the weight's
// bytes, is the cost. Here a tile of weight rows is unpacked once (into L1) and every row of x
// meets it, with vector lanes running over rows of x: each lane's int32 is one output's dot over
// 32 inputs, so nothing is summed across lanes. Same numerics as decode: x rounded per 64-block
// by round_block, integer sums per 32 inputs, times (weight scale * x scale), plus the zeros
// times x's float group sums (only the order of the float additions differs).
//
// Layout: input pair (2p, 2p + 1) is one int32 (input 2p in the low int16): a packed byte p
// holds exactly the codes of that pair, and vpdpwssd / vpmaddwd multiply pairs. x is stored
// transposed, [K / 2 pairs, Mp rows], so a vector load takes one pair of L rows; the weight
// pair is broadcast.
constexpr int64_t kPrefillMaxRows = 512;  // kernels.INT4_PREFILL_MAX_ROWS
constexpr int64_t kRowBlock = 128;        // rows of x whose pairs stay in L2 while the tiles pass

// x [M, K] for the prefill, transposed; rows M..Mp-1 are zero (their outputs are not stored)
struct PrefillX {
  std::vector<int32_t> pairs;  // [K / 2, Mp]
  std::vector<float> s;        // [K / kBlock, Mp]: the blocks' int16 scales
  std::vector<float> sum;      // [G, Mp]: the groups' float sums
  int64_t K = 0, G = 0, Mp = 0;

  void prepare(const float* x, int64_t M, int64_t K_, int64_t G_, int64_t rows_multiple,
               xla::ffi::ThreadPool& pool, int64_t helpers) {
    K = K_, G = G_, Mp = (M + rows_multiple - 1) / rows_multiple * rows_multiple;
    pairs.assign(size_t(K / 2 * Mp), 0);
    s.assign(size_t(K / kBlock * Mp), 0.0f);
    sum.assign(size_t(G * Mp), 0.0f);
    constexpr int64_t kRows = 16;  // rows per task: neighbouring columns written by one thread
    jaxaccel::parallel_for(pool, (M + kRows - 1) / kRows, helpers, [&](int64_t c) {
      int16_t qb[kBlock];
      for (int64_t m = c * kRows; m < std::min(M, (c + 1) * kRows); ++m) {
        group_sums(x + m * K, K, G, sum.data() + m, Mp);
        for (int64_t b = 0; b < K / kBlock; ++b) {
          s[b * Mp + m] = round_block(x + m * K + b * kBlock, qb);
          for (int64_t p = 0; p < kBlock / 2; ++p)
            pairs[(b * (kBlock / 2) + p) * Mp + m] =
                int32_t(uint32_t(uint16_t(qb[2 * p])) | (uint32_t(uint16_t(qb[2 * p + 1])) << 16));
        }
      }
    });
  }
};

#if JAXACCEL_INT4_PATH > 0
#if JAXACCEL_INT4_PATH == 2
struct Vec {  // AVX-512 VNNI: 16 rows of x per vector
  static constexpr int L = 16, NR = 6, MV = 2;  // a tile of NR weight rows x MV vectors of rows
#define JAXACCEL_INT4_UNROLL 16
  using I = __m512i;
  using F = __m512;
  static I izero() { return _mm512_setzero_si512(); }
  static I load(const int32_t* p) { return _mm512_loadu_si512((const void*)p); }
  static I bcast(int32_t v) { return _mm512_set1_epi32(v); }
  static I dot(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
struct Vec {  // AVX2: 8 rows of x per vector, vpmaddwd + vpaddd
  static constexpr int L = 8, NR = 4, MV = 1;
#define JAXACCEL_INT4_UNROLL 4
  using I = __m256i;
  using F = __m256;
  static I izero() { return _mm256_setzero_si256(); }
  static I load(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static I bcast(int32_t v) { return _mm256_set1_epi32(v); }
  static I dot(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif
constexpr int64_t kRowsMultiple = Vec::L * Vec::MV;
#define JAXACCEL_PRAGMA(x) _Pragma(#x)
#define JAXACCEL_UNROLL(n) JAXACCEL_PRAGMA(GCC unroll n)

// Weight rows n0 .. n0 + NR - 1 (unpacked: wt [NR, K / 2] int32 pairs) against rows m0 .. m0 +
// L * MV - 1 of x. Each int32 lane sums 16 pairs (32 products of at most 15 * 32767) per half
// block, so it cannot overflow.
void prefill_tile(const PrefillX& xp, int64_t m0, const int32_t* wt, int64_t n0, int64_t N, const float* scale,
                  const float* zero, float* y, int64_t M) {
  constexpr int NR = Vec::NR, MV = Vec::MV, L = Vec::L;
  const int64_t K = xp.K, G = xp.G, gs = K / G, Mp = xp.Mp;
  int64_t nr[NR];  // weight rows past N (a partial tile) read row N - 1's scales; not stored
  for (int r = 0; r < NR; ++r) nr[r] = std::min(n0 + r, N - 1);
  Vec::F acc[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v] = Vec::fzero();
  for (int64_t h = 0; h < K / 32; ++h) {  // 32 inputs (16 pairs) share one weight scale
    Vec::I t[NR][MV];
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < MV; ++v) t[r][v] = Vec::izero();
    const int32_t* xh = xp.pairs.data() + h * 16 * Mp + m0;
    JAXACCEL_UNROLL(JAXACCEL_INT4_UNROLL)  // GCC copies the sums each step of a rolled AVX-512 loop
    for (int p = 0; p < 16; ++p) {
      Vec::I xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = Vec::load(xh + p * Mp + v * L);
      for (int r = 0; r < NR; ++r) {
        const Vec::I wv = Vec::bcast(wt[r * (K / 2) + h * 16 + p]);
        for (int v = 0; v < MV; ++v) t[r][v] = Vec::dot(t[r][v], xv[v], wv);
      }
    }
    const int64_t g = h * 32 / gs, b = h / 2;
    for (int v = 0; v < MV; ++v) {
      const Vec::F xs = Vec::loadf(xp.s.data() + b * Mp + m0 + v * L);
      for (int r = 0; r < NR; ++r)
        acc[r][v] = Vec::fma(Vec::cvt(t[r][v]), Vec::mul(xs, Vec::set1(scale[nr[r] * G + g])), acc[r][v]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int v = 0; v < MV; ++v) {
      const Vec::F xsum = Vec::loadf(xp.sum.data() + g * Mp + m0 + v * L);
      for (int r = 0; r < NR; ++r) acc[r][v] = Vec::fma(Vec::set1(zero[nr[r] * G + g]), xsum, acc[r][v]);
    }
  alignas(64) float out[L];
  for (int r = 0; r < NR && n0 + r < N; ++r)
    for (int v = 0; v < MV; ++v) {
      Vec::store(out, acc[r][v]);
      for (int l = 0; l < L && m0 + v * L + l < M; ++l) y[(m0 + v * L + l) * N + n0 + r] = out[l];
    }
}

// Tiles [t0, t1) of Vec::NR weight rows against all M rows of x, a block of rows at a time.
void prefill_tiles(const PrefillX& xp, int64_t M, const uint8_t* w, const float* scale, const float* zero, float* y,
                   int64_t N, int64_t t0, int64_t t1) {
  constexpr int NR = Vec::NR;
  const int64_t K2 = xp.K / 2;
  std::vector<int32_t> wt(size_t(NR * K2));
  for (int64_t mb = 0; mb < xp.Mp; mb += kRowBlock)
    for (int64_t t = t0; t < t1; ++t) {
      for (int r = 0; r < NR; ++r) {  // unpack: byte j -> the pair (low nibble, high nibble)
        int32_t* dst = wt.data() + r * K2;
        if (t * NR + r >= N) {
          std::fill(dst, dst + K2, 0);
          continue;
        }
        const uint8_t* row = w + (t * NR + r) * K2;
        for (int64_t j = 0; j < K2; ++j) dst[j] = int32_t(row[j] & 0x0F) | (int32_t(row[j] >> 4) << 16);
      }
      for (int64_t m0 = mb; m0 < std::min(xp.Mp, mb + kRowBlock); m0 += kRowsMultiple)
        prefill_tile(xp, m0, wt.data(), t * NR, N, scale, zero, y, M);
    }
}
#endif

using Matrix = ffi::Buffer<ffi::F32, 2>;
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;
using Packed = ffi::Buffer<ffi::U8, 2>;  // (aliases: a comma inside the handler macro splits its arguments)

ffi::Error MatvecInt4(ffi::ThreadPool pool, Matrix x, Packed w, Matrix scale, Matrix zero, MatrixOut y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), zd = zero.dimensions();
  const int64_t M = xd[0], K = xd[1], N = wd[0], G = sd[1];
  if (M < 1 || M > kPrefillMaxRows || wd[1] * 2 != K || sd[0] != N || zd[0] != N || zd[1] != G)
    return ffi::Error::InvalidArgument("jaxaccel int4 matvec: needs x [M <= 512, K], packed w [N, K / 2], "
                                       "scale and zero [N, G]");
  if (K % kBlock || G < 1 || K % G || (K / G) % 32)
    return ffi::Error::InvalidArgument("jaxaccel int4 matvec: K must be a multiple of 64 and groups a multiple "
                                       "of 32 inputs (kernels.int4_wants)");
  const uint8_t* wp = w.typed_data();
  const float *sp = scale.typed_data(), *zp = zero.typed_data(), *xp = x.typed_data();
  float* yp = y->typed_data();
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, jaxaccel::kMaxHelpers);
  // too small to pay for a hand-off (the prefill's rows multiply the work on a small weight)
  if (N * K / 2 < (128 << 10) && (M <= kMaxRows || M * N * K < (int64_t(1) << 24))) helpers = 0;
#if JAXACCEL_INT4_PATH > 0
  if (M > kMaxRows) {  // the prefill
    PrefillX xq;
    xq.prepare(xp, M, K, G, kRowsMultiple, pool, helpers);
    const int64_t tiles = (N + Vec::NR - 1) / Vec::NR, parts = (helpers + 1) * 4;
    const int64_t chunk = std::max<int64_t>(1, (tiles + parts - 1) / parts), n_chunks = (tiles + chunk - 1) / chunk;
    jaxaccel::parallel_for(pool, n_chunks, helpers, [&](int64_t c) {
      prefill_tiles(xq, M, wp, sp, zp, yp, N, c * chunk, std::min(tiles, (c + 1) * chunk));
    });
    return ffi::Error::Success();
  }
#endif
  DecodeX xq;  // decode rows (and the portable build's every row count)
  xq.prepare(xp, M, K, G);
  // several chunks per participant, so a late starter still helps
  const int64_t parts = (helpers + 1) * 8, chunk = std::max<int64_t>(32, (N + parts - 1) / parts);
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  jaxaccel::parallel_for(pool, n_chunks, helpers, [&](int64_t c) {
    rows(xq, M, wp, sp, zp, yp, N, c * chunk, std::min(N, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

// How int4 weights are multiplied in this build: 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable
extern "C" int JaxaccelInt4Path() { return JAXACCEL_INT4_PATH; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelMatvecInt4, MatvecInt4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Packed>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>());
