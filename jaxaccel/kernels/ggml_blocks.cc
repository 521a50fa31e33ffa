// jaxaccel CPU matvec for weights kept in llama.cpp's (ggml's) own block layouts, as a GGUF file
// stores them: y[M, N] = x[M, K] . W^T for decode rows (M <= 8) and prefill rows (M <= 512, the
// SIMD builds; kernels.ggml.wants), W given as the file's bytes, one row
// of `out` per row: uint8 [N, K / QK * block_bytes]. Types (their ggml ids):
//   Q4_0 (2), Q5_0 (6), Q8_0 (8): blocks of 32 inputs, one float16 scale d:  W = d * (q - offset)
//   Q4_K (12): super-blocks of 256: float16 d, dmin, 12 bytes of 6-bit scales and mins for 8
//              sub-blocks of 32, 4-bit codes:  W = (d * sc) * q - (dmin * m)
//   Q6_K (14): super-blocks of 256: 6-bit codes (low nibbles + 2 high bits), int8 scales per 16
//              inputs, float16 d:  W = (d * sc) * (q - 32)
//
// Why: jaxaccel.load(gguf) otherwise dequantizes every tensor to float32 (four to seven times the
// bytes a decode step must read) or re-quantizes it into our own int8 / int4 layout (a second
// rounding). Here the file's blocks are read as they are and widened in registers.
//
// How: every type is seen as sub-blocks of 32 inputs: 32 codes (made int16, offset removed), a
// scale for inputs 0-15 and one for 16-31 (equal except in Q6_K) and a min (Q4_K only). x is
// rounded to int16 per block of 32 inputs, within 2^-16 of the block's largest |x| (as int4.cc
// and the int8 matvec do), once per call; the codes meet it in vpdpwssd (AVX-512 VNNI) or
// vpmaddwd (AVX2) and each sub-block's int32 sums are scaled in float:
//   y[m, n] = sum_s xs[m, s] * (sa * dot(q, xq)[0:16] + sb * dot(q, xq)[16:32]) - mn * xsum[m, s]
// with xsum the float sum of x over the sub-block. Overflow: an int32 lane sums 2 products of at
// most 128 * 32767 per sub-block.
//
// Prefill rows: a tile of kTile weight rows meets 4 rows of x at a time, so both stay in L1; the
// codes are widened once per 4 rows of x, and no float32 copy of the weight is ever written (XLA's
// route dequantizes every weight in every prefill).
//
// Batch 1 (AVX2 build): four weight rows from four distant parts of a chunk go through together
// (stream_kernel), each with its own float sums, so four read streams and four chains of
// multiply-adds are in flight (docs/cpu-kernels.md).
//
// Threads: rows of W are cut into chunks shared by the calling thread and XLA's pool (parallel.h).
// GgmlDotMany hands the chunks of several weights on one x (a layer's q / k / v or gate / up) to
// the pool at once, each weight cut as its own call would cut it, so the outputs are the same.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

constexpr int64_t kSub = 32;        // inputs per sub-block (and per int16 block of x)
constexpr int64_t kMaxRows = 512;   // prefill rows (kernels.ggml.PREFILL_MAX_ROWS); decode: <= 8
constexpr int64_t kTile = 16;       // weight rows per tile against each group of rows of x
constexpr int64_t kRowGroup = 4;    // rows of x multiplied together against one weight row
constexpr int64_t kAheadBytes = 8192;  // how far ahead the weight rows are prefetched

enum : int64_t { kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

// (inputs, bytes) of one block of a type; {0, 0} for a type this file does not read
struct Layout { int64_t inputs, bytes; };
Layout layout(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18};
    case kQ5_0: return {32, 22};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

// IEEE float16 bits -> float32, exact (F16C's instruction where the tier has it; the bit
// arithmetic below, which gives the same floats, on the portable tier)
inline float half(const uint8_t* p) {
#if defined(__F16C__) && defined(__AVX2__) && !defined(JAXACCEL_GENERIC)  // immintrin.h is included for AVX2
  uint16_t bits16;
  std::memcpy(&bits16, p, 2);
  return _cvtsh_ss(bits16);
#else
  const uint32_t h = uint32_t(p[0]) | (uint32_t(p[1]) << 8);
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24, exact in float32
    float f = float(man) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The scales of sub-block j (0-7 in K types, 0 otherwise) of `block`: W = sa|sb * code - mn
struct Scales { float sa, sb, mn; };

template <int64_t T>
inline Scales scales(const uint8_t* block, int64_t j) {
  if constexpr (T == kQ4_K) {
    const uint8_t* s = block + 4;
    int sc, m;
    if (j < 4) {
      sc = s[j] & 63, m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    const float d = half(block) * float(sc);
    return {d, d, half(block + 2) * float(m)};
  } else if constexpr (T == kQ6_K) {
    const float d = half(block + 208);
    const int8_t* s = reinterpret_cast<const int8_t*>(block + 192);
    return {d * float(s[2 * j]), d * float(s[2 * j + 1]), 0.0f};
  } else {
    const float d = half(block);
    return {d, d, 0.0f};
  }
}

// The 32 codes of sub-block j with the type's offset removed (the reference the SIMD paths follow)
template <int64_t T>
inline void codes_scalar(const uint8_t* block, int64_t j, int16_t* out) {
  for (int64_t l = 0; l < kSub; ++l) {
    if constexpr (T == kQ8_0) {
      out[l] = int8_t(block[2 + l]);
    } else if constexpr (T == kQ4_0) {
      const uint8_t b = block[2 + l % 16];
      out[l] = int16_t((l < 16 ? b & 0xF : b >> 4) - 8);
    } else if constexpr (T == kQ5_0) {
      uint32_t qh;
      std::memcpy(&qh, block + 2, 4);
      const uint8_t b = block[6 + l % 16];
      out[l] = int16_t(((l < 16 ? b & 0xF : b >> 4) | (((qh >> l) & 1) << 4)) - 16);
    } else if constexpr (T == kQ4_K) {
      const uint8_t b = block[16 + (j / 2) * 32 + l];
      out[l] = int16_t(j & 1 ? b >> 4 : b & 0xF);
    } else {  // Q6_K: half n = j / 4 of the super-block, group g = j % 4 of it
      const int64_t n = j / 4, g = j % 4;
      const uint8_t lo = block[64 * n + (g & 1) * 32 + l], hi = block[128 + 32 * n + l];
      out[l] = int16_t(((g >= 2 ? lo >> 4 : lo & 0xF) | (((hi >> (2 * g)) & 3) << 4)) - 32);
    }
  }
}

// x [M, K] prepared for one call: int16 codes per block of 32 inputs, their scales, float sums.
struct PreparedX {
  std::vector<int16_t> q;  // [M, K]
  std::vector<float> s;    // [M, K / 32]
  std::vector<float> sum;  // [M, K / 32]
  int64_t K = 0;

  void prepare(const float* x, int64_t M, int64_t K_) {
    K = K_;
    const int64_t nb = K / kSub;
    q.assign(size_t(M * K), 0);
    s.assign(size_t(M * nb), 0.0f);
    sum.assign(size_t(M * nb), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + m * K + b * kSub;
        float top = 0.0f, t = 0.0f;
        bool finite = true;
        for (int64_t k = 0; k < kSub; ++k) {
          finite &= std::isfinite(xb[k]);
          top = std::max(top, std::fabs(xb[k]));
          t += xb[k];
        }
        sum[m * nb + b] = t;
        // a NaN or infinity makes the block's scale NaN, and so the row's outputs
        const float sc = finite ? top / 32767.0f : std::numeric_limits<float>::quiet_NaN();
        s[m * nb + b] = sc;
        if (!(finite && sc > 0.0f)) continue;
        int16_t* qb = q.data() + m * K + b * kSub;
        for (int64_t k = 0; k < kSub; ++k)  // clamped: a subnormal scale can round past 32767
          qb[k] = int16_t(std::min(32767.0f, std::max(-32767.0f, std::nearbyint(xb[k] / sc))));
      }
  }
};

#if defined(__AVX2__) && !defined(JAXACCEL_GENERIC)
// The 32 codes of sub-block j as bytes (AVX2 ops, shared by the AVX-512 and AVX2 paths): unsigned
// with the offset still in (the caller removes it), signed for Q8_0.
template <int64_t T>
inline __m256i code_bytes(const uint8_t* block, int64_t j) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (T == kQ8_0) {
    return _mm256_loadu_si256((const __m256i*)(block + 2));
  } else if constexpr (T == kQ4_0 || T == kQ5_0) {
    const __m128i p = _mm_loadu_si128((const __m128i*)(block + (T == kQ5_0 ? 6 : 2)));
    __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), low4);  // inputs 0-15 | 16-31
    if constexpr (T == kQ5_0) {  // bit l of qh -> 0x10 in byte l
      uint32_t qh;
      std::memcpy(&qh, block + 2, 4);
      const __m256i spread = _mm256_shuffle_epi8(
          _mm256_set1_epi32(int(qh)), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
      u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
    }
    return u;
  } else if constexpr (T == kQ4_K) {
    const __m256i p = _mm256_loadu_si256((const __m256i*)(block + 16 + (j / 2) * 32));
    return _mm256_and_si256(j & 1 ? _mm256_srli_epi16(p, 4) : p, low4);
  } else {  // Q6_K
    const int64_t n = j / 4, g = j % 4;
    const __m256i lo = _mm256_loadu_si256((const __m256i*)(block + 64 * n + (g & 1) * 32));
    const __m256i hi = _mm256_loadu_si256((const __m256i*)(block + 128 + 32 * n));
    const __m256i nib = _mm256_and_si256(g >= 2 ? _mm256_srli_epi16(lo, 4) : lo, low4);
    const __m256i top = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(int(2 * g))), _mm256_set1_epi8(3));
    return _mm256_or_si256(nib, _mm256_slli_epi16(top, 4));
  }
}

template <int64_t T>
constexpr int16_t offset() { return T == kQ4_0 ? 8 : T == kQ5_0 ? 16 : T == kQ6_K ? 32 : 0; }

// The 32 codes of sub-block j widened to int16, offset removed: inputs 0-15 in a, 16-31 in b.
// The offset comes off the bytes (every type's codes minus its offset fit int8), one
// subtraction for 32 codes.
template <int64_t T>
inline void codes16(const uint8_t* block, int64_t j, __m256i& a, __m256i& b) {
  if constexpr (T == kQ8_0) {  // signed bytes as stored: widened straight from memory
    a = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(block + 2)));
    b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(block + 18)));
  } else {
    __m256i u = code_bytes<T>(block, j);
    if constexpr (offset<T>() != 0) u = _mm256_sub_epi8(u, _mm256_set1_epi8(char(offset<T>())));
    a = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(u));
    b = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(u, 1));
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_GGML_PATH 2
// M rows of x (from row m0) against weight row n: per sub-block, its 32 codes widened to 32
// int16 lanes once, one vpdpwssd per row of x.
template <int64_t T, int M>
void row_kernel(const PreparedX& xq, int64_t m0, const uint8_t* row, int64_t QK, int64_t bytes, float* y,
                int64_t N, int64_t n) {
  const int64_t K = xq.K, nb = K / kSub, subs = QK / kSub;
  __m512 acc[M];
  float mins[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps(), mins[m] = 0.0f;
  for (int64_t blk = 0; blk < K / QK; ++blk) {
    const uint8_t* block = row + blk * bytes;
    for (int64_t j = 0; j < subs; ++j) {
      const int64_t b = blk * subs + j;
      const __m256i u = code_bytes<T>(block, j);
      __m512i codes = T == kQ8_0 ? _mm512_cvtepi8_epi16(u) : _mm512_cvtepu8_epi16(u);
      if constexpr (offset<T>() != 0) codes = _mm512_sub_epi16(codes, _mm512_set1_epi16(offset<T>()));
      const Scales sc = scales<T>(block, j);
      for (int m = 0; m < M; ++m) {
        const int16_t* xv = xq.q.data() + (m0 + m) * K + b * kSub;
        const __m512i t = _mm512_dpwssd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512((const void*)xv));
        const float xs = xq.s[(m0 + m) * nb + b];
        // int32 lanes 0-7: inputs 0-15 (scale sa), lanes 8-15: inputs 16-31 (sb)
        const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc.sa * xs), _mm512_set1_ps(sc.sb * xs));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[m]);
        if constexpr (T == kQ4_K) mins[m] += sc.mn * xq.sum[(m0 + m) * nb + b];
      }
    }
  }
  for (int m = 0; m < M; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]) - mins[m];
}
#elif defined(__AVX2__) && defined(__FMA__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_GGML_PATH 1
using jaxaccel::hsum;

// As the AVX-512 one, with vpmaddwd on two halves of 16 int16 lanes (inputs 0-15 and 16-31).
template <int64_t T, int M>
void row_kernel(const PreparedX& xq, int64_t m0, const uint8_t* row, int64_t QK, int64_t bytes, float* y,
                int64_t N, int64_t n) {
  const int64_t K = xq.K, nb = K / kSub, subs = QK / kSub;
  __m256 acc[M];
  float mins[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), mins[m] = 0.0f;
  for (int64_t blk = 0; blk < K / QK; ++blk) {
    const uint8_t* block = row + blk * bytes;
    for (int64_t j = 0; j < subs; ++j) {
      const int64_t b = blk * subs + j;
      __m256i ca, cb;
      codes16<T>(block, j, ca, cb);
      const Scales sc = scales<T>(block, j);
      for (int m = 0; m < M; ++m) {
        const int16_t* xv = xq.q.data() + (m0 + m) * K + b * kSub;
        const __m256i ta = _mm256_madd_epi16(ca, _mm256_loadu_si256((const __m256i*)xv));
        const __m256i tb = _mm256_madd_epi16(cb, _mm256_loadu_si256((const __m256i*)(xv + 16)));
        const float xs = xq.s[(m0 + m) * nb + b];
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ta), _mm256_set1_ps(sc.sa * xs), acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tb), _mm256_set1_ps(sc.sb * xs), acc[m]);
        if constexpr (T == kQ4_K) mins[m] += sc.mn * xq.sum[(m0 + m) * nb + b];
      }
    }
  }
  for (int m = 0; m < M; ++m) y[(m0 + m) * N + n] = hsum(acc[m]) - mins[m];
}

// A decode step's one row of x against S far-apart weight rows, so S read streams are in flight
// (as in the int8 and int4 kernels, see docs/cpu-kernels.md) and the S rows' float sums are
// independent chains that overlap, where row_kernel<T, 1> waits on one chain per sub-block.
// Types with one scale per sub-block add its two int32 halves before the one float multiply-add.
template <int64_t T, int S>
void stream_kernel(const PreparedX& xq, const uint8_t* w, int64_t row_bytes, float* y, const int64_t* rows) {
  const Layout lay = layout(T);
  const int64_t K = xq.K, subs = lay.inputs / kSub;
  __m256 acc[S], acc_b[S];
  float mins[S];
  for (int i = 0; i < S; ++i) acc[i] = acc_b[i] = _mm256_setzero_ps(), mins[i] = 0.0f;
  for (int64_t blk = 0; blk < K / lay.inputs; ++blk)
    for (int64_t j = 0; j < subs; ++j) {
      const int64_t b = blk * subs + j;
      const int16_t* xv = xq.q.data() + b * kSub;
      const __m256i x0 = _mm256_loadu_si256((const __m256i*)xv), x1 = _mm256_loadu_si256((const __m256i*)(xv + 16));
      const float xs = xq.s[b];
      for (int i = 0; i < S; ++i) {
        const uint8_t* block = w + rows[i] * row_bytes + blk * lay.bytes;
        __m256i ca, cb;
        codes16<T>(block, j, ca, cb);
        const __m256i ta = _mm256_madd_epi16(ca, x0), tb = _mm256_madd_epi16(cb, x1);
        const Scales sc = scales<T>(block, j);
        if constexpr (T == kQ6_K) {  // a scale per 16 inputs
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ta), _mm256_set1_ps(sc.sa * xs), acc[i]);
          acc_b[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tb), _mm256_set1_ps(sc.sb * xs), acc_b[i]);
        } else {  // a lane sums 4 products of at most 128 * 32767: no int32 overflow
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ta, tb)), _mm256_set1_ps(sc.sa * xs), acc[i]);
        }
        if constexpr (T == kQ4_K) mins[i] += sc.mn * xq.sum[b];
      }
    }
  for (int i = 0; i < S; ++i) y[rows[i]] = hsum(_mm256_add_ps(acc[i], acc_b[i])) - mins[i];
}
#define JAXACCEL_GGML_STREAMS 4
#else
#define JAXACCEL_GGML_PATH 0
// Portable: the same integer sums, one code at a time.
template <int64_t T, int M>
void row_kernel(const PreparedX& xq, int64_t m0, const uint8_t* row, int64_t QK, int64_t bytes, float* y,
                int64_t N, int64_t n) {
  const int64_t K = xq.K, nb = K / kSub, subs = QK / kSub;
  float total[M] = {};
  int16_t codes[kSub];
  for (int64_t blk = 0; blk < K / QK; ++blk) {
    const uint8_t* block = row + blk * bytes;
    for (int64_t j = 0; j < subs; ++j) {
      const int64_t b = blk * subs + j;
      codes_scalar<T>(block, j, codes);
      const Scales sc = scales<T>(block, j);
      for (int m = 0; m < M; ++m) {
        const int16_t* xv = xq.q.data() + (m0 + m) * K + b * kSub;
        int32_t half_sums[2] = {0, 0};
        for (int64_t l = 0; l < kSub; ++l) half_sums[l / 16] += int32_t(codes[l]) * xv[l];
        const float xs = xq.s[(m0 + m) * nb + b];
        total[m] += float(half_sums[0]) * (sc.sa * xs) + float(half_sums[1]) * (sc.sb * xs) -
                    sc.mn * xq.sum[(m0 + m) * nb + b];
      }
    }
  }
  for (int m = 0; m < M; ++m) y[(m0 + m) * N + n] = total[m];
}
#endif

template <int64_t T>
void rows(const PreparedX& xq, int64_t M, const uint8_t* w, int64_t row_bytes, float* y, int64_t N, int64_t n0,
          int64_t n1) {
  const Layout lay = layout(T);
#ifdef JAXACCEL_GGML_STREAMS
  if (M == 1)  // S streams over S equal parts of [n0, n1); the rows left over go one at a time below
    n0 = jaxaccel::stream_rows<JAXACCEL_GGML_STREAMS>(n0, n1, [&](const int64_t* r) {
      stream_kernel<T, JAXACCEL_GGML_STREAMS>(xq, w, row_bytes, y, r);
    });
#endif
  const int64_t ahead = std::max<int64_t>(1, kAheadBytes / row_bytes);
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    for (int64_t n = t0; n < t1; ++n)
      if (n + ahead < N)
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(w + (n + ahead) * row_bytes + off, 0, 3);
    for (int64_t m0 = 0; m0 < M; m0 += kRowGroup)
      for (int64_t n = t0; n < t1; ++n) {
        const uint8_t* row = w + n * row_bytes;
        switch (std::min(kRowGroup, M - m0)) {
          case 1: row_kernel<T, 1>(xq, m0, row, lay.inputs, lay.bytes, y, N, n); break;
          case 2: row_kernel<T, 2>(xq, m0, row, lay.inputs, lay.bytes, y, N, n); break;
          case 3: row_kernel<T, 3>(xq, m0, row, lay.inputs, lay.bytes, y, N, n); break;
          default: row_kernel<T, 4>(xq, m0, row, lay.inputs, lay.bytes, y, N, n); break;
        }
      }
  }
}

using Matrix = ffi::Buffer<ffi::F32, 2>;
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;
using Bytes = ffi::Buffer<ffi::U8, 2>;

// One weight's share of a call: its rows cut into chunks for the pool's threads.
struct Job {
  int64_t type = 0, N = 0, row_bytes = 0, helpers = 0, chunk = 0, n_chunks = 0;
  const uint8_t* w = nullptr;
  float* y = nullptr;

  void operator()(const PreparedX& xq, int64_t M, int64_t c) const {
    const int64_t n0 = c * chunk, n1 = std::min(N, (c + 1) * chunk);
    switch (type) {
      case kQ4_0: rows<kQ4_0>(xq, M, w, row_bytes, y, N, n0, n1); break;
      case kQ5_0: rows<kQ5_0>(xq, M, w, row_bytes, y, N, n0, n1); break;
      case kQ8_0: rows<kQ8_0>(xq, M, w, row_bytes, y, N, n0, n1); break;
      case kQ4_K: rows<kQ4_K>(xq, M, w, row_bytes, y, N, n0, n1); break;
      default: rows<kQ6_K>(xq, M, w, row_bytes, y, N, n0, n1); break;
    }
  }
};

// Helper threads worth handing `bytes` of weights to: none below 128 KiB (the hand-off costs more)
int64_t helpers_for(ffi::ThreadPool& pool, int64_t bytes) {
  return bytes < (128 << 10) ? 0 : std::min<int64_t>(pool.num_threads() - 1, jaxaccel::kMaxHelpers);
}

// Checks w [N, bytes] of ggml type `type` against x [M, K] and describes it as a Job for y [M, N];
// chunks as a call for this weight alone cuts them (several per participant, so a late starter
// still helps), so its rows' sums are the same whichever call computes them.
ffi::Error describe(Job& job, ffi::ThreadPool& pool, int64_t M, int64_t K, const Bytes& w, float* y, int64_t type) {
  const auto wd = w.dimensions();
  const Layout lay = layout(type);
  if (!lay.inputs)
    return ffi::Error::InvalidArgument("jaxaccel ggml matvec: unsupported ggml type (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K)");
  if (M < 1 || M > kMaxRows || K < 1 || K % lay.inputs || wd[1] != K / lay.inputs * lay.bytes)
    return ffi::Error::InvalidArgument("jaxaccel ggml matvec: needs x [M <= 512, K] with K a multiple of the type's "
                                       "block and w [N, K / block * block bytes] (kernels.ggml.wants)");
  job = {type, wd[0], wd[1], helpers_for(pool, wd[0] * wd[1]), 0, 0, w.typed_data(), y};
  const int64_t parts = (job.helpers + 1) * 8;
  job.chunk = std::max<int64_t>(32, (job.N + parts - 1) / parts);
  job.n_chunks = (job.N + job.chunk - 1) / job.chunk;
  return ffi::Error::Success();
}

ffi::Error GgmlDot(ffi::ThreadPool pool, Matrix x, Bytes w, MatrixOut y, int64_t type) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  Job job;
  if (auto e = describe(job, pool, M, K, w, y->typed_data(), type); e.failure()) return e;
  PreparedX xq;
  xq.prepare(x.typed_data(), M, K);
  jaxaccel::parallel_for(pool, job.n_chunks, job.helpers, [&](int64_t c) { job(xq, M, c); });
  return ffi::Error::Success();
}

// Several weights (each of its own ggml type, `types`) times the same x, in one call: a layer's
// q / k / v or gate / up projections. x is rounded once, and the pool is handed the chunks of all
// the weights at once, where separate calls each paid a hand-off and a wait for the slowest
// thread. Each output equals GgmlDot's for its weight bit for bit (same rounding, same chunks).
ffi::Error GgmlDotMany(ffi::ThreadPool pool, Matrix x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       ffi::Span<const int64_t> types) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], n = int64_t(rets.size());
  if (n < 1 || int64_t(args.size()) != n || int64_t(types.size()) != n)
    return ffi::Error::InvalidArgument("jaxaccel ggml matvec_many: needs one weight, one ggml type and one result each");
  std::vector<Job> jobs(static_cast<size_t>(n));
  std::vector<int64_t> first(size_t(n) + 1, 0);  // chunks of the jobs before job i
  int64_t bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto w = args.get<Bytes>(i);
    auto y = rets.get<Matrix>(i);
    if (w.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("jaxaccel ggml matvec_many: weights must be uint8 [N, bytes], results float32");
    if (auto e = describe(jobs[i], pool, M, K, *w, (*y)->typed_data(), types[i]); e.failure()) return e;
    bytes += jobs[i].N * jobs[i].row_bytes;
    first[i + 1] = first[i] + jobs[i].n_chunks;
  }
  PreparedX xq;
  xq.prepare(x.typed_data(), M, K);
  jaxaccel::parallel_for(pool, first[n], helpers_for(pool, bytes), [&](int64_t c) {
    const int64_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    jobs[i](xq, M, c - first[i]);
  });
  return ffi::Error::Success();
}

}  // namespace

// How ggml blocks are multiplied in this build: 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable
extern "C" int JaxaccelGgmlPath() { return JAXACCEL_GGML_PATH; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelGgmlDot, GgmlDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Bytes>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("ggml_type"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelGgmlDotMany, GgmlDotMany,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("ggml_types"));
