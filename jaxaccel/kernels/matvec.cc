// jaxaccel CPU matvec for decode steps: y[M, N] = x[M, K] . W with M small (batch rows); for int8
// weights on VNNI CPUs also the generation's prefill (up to 512 rows, see Run).
//
// Why: XLA's CPU dot reads float32 weights at about the speed of this kernel, but it gains
// nothing from bfloat16 weights and loses 2x with int8 ones at a handful of rows (it converts
// them before multiplying). Decoding reads every weight once per token, so the
// bytes of the weights set the speed; this kernel reads bfloat16 or int8 weights as they are
// stored and widens them to float32 in registers. For int8 weights on CPUs with AVX-512 VNNI, x
// is instead rounded to int16 per block of 32-128 inputs (2^-16 of the block's largest |x|) and
// multiplied in int32 (vpdpwssd), measured faster than widening at 1-4 rows; 5-8 rows take it
// for long rows only; more than 8 rows (the generation's prefill, int8 only) always take it.
// AVX2 CPUs (no AVX-512) take the same int16 path for int8 weights at every row count, with
// vpmaddwd + vpaddd in place of vpdpwssd: widening int8 to float32 eight lanes at a time made
// int8 decode there no faster than float32.
//
// Threads: the weight rows are cut into chunks shared by the calling thread and XLA's intra-op
// pool threads (parallel.h). MatvecScaledMany hands the chunks of several int8 weights on one x
// to the threads at once (a layer's q / k / v, gate / up).
//
// Layouts (w_in_axis):
//   0: W is [K, N] (Dense kernels [in, out]), float32 or bfloat16. Chunks split K; chunk c
//      sums into its own partial [M, N] (chunk 0 into y), added up in chunk order at the end,
//      so the result does not depend on which thread took which chunk (same input, same bits).
//   1: W is [N, K] (a tied embedding's `attend`, quantized weights [out, in]), float32,
//      bfloat16 or int8 with float32 scales [N, G] (one per K / G inputs). Chunks split N.
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__AVX512F__) || defined(__AVX2__)) && !defined(JAXACCEL_GENERIC)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 16;  // more rows: only int8 weights on the VNNI path (the generation's prefill)
constexpr int64_t kVnniMaxRows = 4;   // decode rows on the VNNI path; one group of the prefill's rows
constexpr int64_t kWidenMaxRows = 8;  // 5..8 rows may widen int8 to float32 instead (see Run)

using jaxaccel::widen;

// ---- generic code (any CPU; GCC vectorizes the independent lanes) -----------------------------
constexpr int kLanes = 16;  // float32 lanes of one AVX-512 register

// acc[m, :] += sum_{k in [k0, k1)} x[m, k] * W[k, :]   (W row-major [K, N]), four rows of W per
// pass over acc (GCC vectorizes the n loop; measured faster than hand-written AVX-512 here).
// The four rows of a pass come from the four quarters of [k0, k1), not from one place: four
// streams in different 4 KiB pages keep more reads in flight than one stream, whose hardware
// prefetch stops at every page end. Measured faster than four adjacent rows for every Gemma 3
// layer shape, float32 and bfloat16 (`python -m bench.matvec`
// times each shape against XLA's dot and the read bandwidth).
template <typename T>
void kn_chunk(const float* __restrict x, const T* __restrict w, float* __restrict acc, int64_t M,
              int64_t K, int64_t N, int64_t k0, int64_t k1) {
  const int64_t q = (k1 - k0) / 4;  // rows per stream
  for (int64_t i = 0; i < q; ++i) {
    const int64_t k = k0 + i;
    const T *w0 = w + k * N, *w1 = w0 + q * N, *w2 = w1 + q * N, *w3 = w2 + q * N;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      const float a0 = xm[0], a1 = xm[q], a2 = xm[2 * q], a3 = xm[3 * q];
      float* __restrict y = acc + m * N;
      for (int64_t n = 0; n < N; ++n)
        y[n] += a0 * widen(w0[n]) + a1 * widen(w1[n]) + a2 * widen(w2[n]) + a3 * widen(w3[n]);
    }
  }
  for (int64_t k = k0 + 4 * q; k < k1; ++k) {
    const T* w0 = w + k * N;
    for (int64_t m = 0; m < M; ++m) {
      const float a0 = x[m * K + k];
      float* __restrict y = acc + m * N;
      for (int64_t n = 0; n < N; ++n) y[n] += a0 * widen(w0[n]);
    }
  }
}

// y[m, n] = sum_g scale[n, g] * dot(x[m, group g], W[n, group g]) for n in [n0, n1)
// (W row-major [N, K]; scale null = all ones, one group)
template <typename T>
void nk_generic(const float* x, const T* w, const float* scale, int64_t G, float* y, int64_t M,
                int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t gs = K / G;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0;
      for (int64_t g = 0; g < G; ++g) {
        float lanes[kLanes] = {0}, s = 0;
        const float* a = x + m * K + g * gs;
        const T* b = w + n * K + g * gs;
        int64_t k = 0;
        for (; k + kLanes <= gs; k += kLanes)
          for (int j = 0; j < kLanes; ++j) lanes[j] += a[k + j] * widen(b[k + j]);
        for (; k < gs; ++k) s += a[k] * widen(b[k]);
        for (int j = 0; j < kLanes; ++j) s += lanes[j];
        total += (scale ? scale[n * G + g] : 1.0f) * s;
      }
      y[m * N + n] = total;
    }
}

// x [M, K] rounded to int16 per block of `block` inputs (the int8 kernel's activations):
// s[m, b] = max |x[m, block b]| / 32767 and q = x / s rounded to nearest even, so each input is
// within s / 2 = 2^-16 of its block's largest (a block of zeros: s = 0, q = 0; a NaN or
// infinity makes s NaN, and so the row's outputs).
struct QuantizedX {
  std::vector<int16_t> q;
  std::vector<float> s;
  int64_t block = 0;  // 0: not quantized (the float path)

  // the block the int8 kernel uses for group size gs (0: none fits, use the float path)
  static int64_t block_for(int64_t gs) {
    for (int64_t b : {128, 64, 32})
      if (gs % b == 0) return b;
    return 0;
  }

  // sizes the buffers for x [M, K] in blocks of b (0: the float path); then quantize_row(m) for each m
  void prepare(int64_t M, int64_t K, int64_t b) {
    block = b;
    if (b == 0) return;
    q.resize(size_t(M * K));
    s.resize(size_t(M * (K / b)));
  }

  void quantize_row(const float* x, int64_t K, int64_t m) {
    const int64_t b = block, nb = K / b;
    for (int64_t j = 0; j < nb; ++j) {
      const float* xb = x + m * K + j * b;
      float top = 0.0f;
      bool finite = true;
      for (int64_t k = 0; k < b; ++k) {
        finite &= std::isfinite(xb[k]);
        top = std::max(top, std::fabs(xb[k]));
      }
      const float sc = finite ? top / 32767.0f : std::numeric_limits<float>::quiet_NaN();
      s[m * nb + j] = sc;
      int16_t* qb = q.data() + m * K + j * b;
      for (int64_t k = 0; k < b; ++k)
        qb[k] = (finite && sc > 0.0f)  // clamped: a subnormal scale can round just past 32767
                    ? int16_t(std::min(32767.0f, std::max(-32767.0f, std::nearbyint(xb[k] / sc))))
                    : int16_t(0);
    }
  }
};

constexpr int64_t kAheadBytes = 10240;  // how far ahead the int8 [N, K] paths prefetch
constexpr int64_t kInt16Tile = 16;      // weight rows kept in cache while the prefill's row groups pass

// The int16 paths' loop over rows [n0, n1) of W for all M rows of x: tiles of kInt16Tile weight
// rows (kept in cache) against groups of up to kVnniMaxRows rows of x, so the prefill's many
// rows reuse each weight row from cache. tile(x rows, their block scales, y rows, row count,
// first weight row, end) multiplies one tile.
template <int PER, typename Tile>
void int16_tiles(const QuantizedX& xq, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
                 Tile tile) {
  const int64_t nb = K / (32 * PER);
  for (int64_t b0 = n0; b0 < n1; b0 += kInt16Tile)
    for (int64_t m0 = 0; m0 < M; m0 += kVnniMaxRows)
      tile(xq.q.data() + m0 * K, xq.s.data() + m0 * nb, y + m0 * N, std::min(kVnniMaxRows, M - m0), b0,
           std::min(n1, b0 + kInt16Tile));
}

// Asks for the int8 weight row ~kAheadBytes after row n (rows of `K` bytes, `N` of them) to be
// loaded into cache: short int8 rows need more bytes in flight than the out-of-order window
// keeps while one row is multiplied.
inline void prefetch_ahead(const int8_t* row, int64_t K, int64_t n, int64_t N) {
  const int64_t rows_ahead = std::max<int64_t>(1, kAheadBytes / K);
  const char* ahead = reinterpret_cast<const char*>(row + rows_ahead * K);
  if (n + rows_ahead < N)
    for (int64_t off = 0; off < K; off += 64) __builtin_prefetch(ahead + off, 0, 3);  // as _MM_HINT_T0
}

#if defined(__AVX512F__) && !defined(JAXACCEL_GENERIC)
// ---- AVX-512, int8 [N, K] only (for float32 / bfloat16 GCC's vectorized generic loops measured
// faster than intrinsics): 16 int8 weights widened to float32 in a register, one FMA per row of x
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

constexpr int64_t kMaxVectors = 4096;  // K / 16 limit of the AVX-512 path (K <= 65536)

// One row of W at a time, read front to back (interleaving rows measured slower from DRAM: the
// hardware prefetcher loses the stream), with a software prefetch ~10 KB ahead (short int8
// rows need more bytes in flight than the out-of-order window keeps; measured on one core). Group scales multiply the widened weights (one scale per 16-lane vector, expanded per
// row), so there is one horizontal sum per output. U independent sums hide the FMA latency; M
// and U known at compile time keep the sums in registers.
template <int M, int U>
void nk_row(const float* x, const int8_t* w, const float* scale, int64_t G, float* y, int64_t K,
            int64_t N, int64_t n) {
  const int8_t* row = w + n * K;
  prefetch_ahead(row, K, n, N);
  const int64_t nv = K / kLanes, per_group = nv / G;
  const bool grouped = scale != nullptr && G > 1;
  float sv[kMaxVectors];
  if (grouped)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < per_group; ++j) sv[g * per_group + j] = scale[n * G + g];
  __m512 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  int64_t j = 0;  // vector index
  for (; j + U <= nv; j += U)
    for (int u = 0; u < U; ++u) {
      __m512 v = load16(row + (j + u) * kLanes);
      if (grouped) v = _mm512_mul_ps(v, _mm512_set1_ps(sv[j + u]));
      for (int m = 0; m < M; ++m)
        acc[u][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + (j + u) * kLanes), v, acc[u][m]);
    }
  for (; j < nv; ++j) {
    __m512 v = load16(row + j * kLanes);
    if (grouped) v = _mm512_mul_ps(v, _mm512_set1_ps(sv[j]));
    for (int m = 0; m < M; ++m) acc[0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + j * kLanes), v, acc[0][m]);
  }
  const float s = scale != nullptr && G == 1 ? scale[n] : 1.0f;
  for (int m = 0; m < M; ++m) {
    for (int u = 1; u < U; ++u) acc[0][m] = _mm512_add_ps(acc[0][m], acc[u][m]);
    y[m * N + n] = s * _mm512_reduce_add_ps(acc[0][m]);
  }
}

template <int M>
void nk_fixed(const float* x, const int8_t* w, const float* scale, int64_t G, float* y, int64_t K,
              int64_t N, int64_t n0, int64_t n1) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
  for (int64_t n = n0; n < n1; ++n) nk_row<M, U>(x, w, scale, G, y, K, N, n);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JAXACCEL_VNNI 1
// ---- AVX-512 VNNI, int8 [N, K]: x rounded to int16 per block of XB inputs (QuantizedX), then
// 32 int8 weights sign-extended to int16 and multiplied with vpdpwssd (int32 sums of pairs), one
// float multiply-add per block with scale[n, g] * x's block scale. Widening int8 to float32
// costs two instructions per 16 weights plus the FMA; this costs two per 32 plus one per block,
// which makes the tied 262144 x 640 embedding of Gemma 3 (one scale per 32) read at memory speed.
// Overflow: an int32 lane sums XB / 16 <= 8 products of at most 127 * 32767 per block, far below 2^31.
// At 5-8 rows the vpdpwssd per row and 32 weights can cost more than the float path's two widening
// instructions per 16 weights shared by all rows: Run keeps widening there for rows of fewer than
// 1024 inputs or blocks of 32 (measured), and for more than 8 rows always takes this path.

template <int M, int PER>  // PER = XB / 32 vectors per activation block; xv, xs, y: M rows from the group's first
void nk_vnni_row(const int16_t* xv, const float* xs, const int8_t* w, const float* scale, int64_t G, float* y,
                 int64_t K, int64_t N, int64_t n) {
  const int8_t* row = w + n * K;
  prefetch_ahead(row, K, n, N);
  constexpr int64_t XB = 32 * PER;
  const int64_t nb = K / XB, blocks_per_group = K / G / XB;
  const float* sw = scale + n * G;
  __m512 acc[2][M];  // blocks alternate between two sums (the FMA's latency)
  for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  float cs[M][16];  // scale[n, g] * x's block scale for 16 blocks at a time
  int64_t g = 0, in_group = 0;
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t count = std::min<int64_t>(16, nb - b0);
    for (int64_t i = 0; i < count; ++i) {
      for (int m = 0; m < M; ++m) cs[m][i] = sw[g] * xs[m * nb + b0 + i];
      if (++in_group == blocks_per_group) in_group = 0, ++g;
    }
    auto block = [&](int64_t i, __m512* sums) {
      __m512i t[M];
      for (int m = 0; m < M; ++m) t[m] = _mm512_setzero_si512();
      for (int j = 0; j < PER; ++j) {
        const int64_t k = (b0 + i) * XB + j * 32;
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k)));
        for (int m = 0; m < M; ++m)
          t[m] = _mm512_dpwssd_epi32(t[m], wv, _mm512_loadu_si512((const void*)(xv + m * K + k)));
      }
      for (int m = 0; m < M; ++m)
        sums[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[m]), _mm512_set1_ps(cs[m][i]), sums[m]);
    };
    int64_t i = 0;
    for (; i + 2 <= count; i += 2) block(i, acc[0]), block(i + 1, acc[1]);
    if (i < count) block(i, acc[0]);
  }
  for (int m = 0; m < M; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]));
}

// S weight rows rows[0..S) against M rows of x. The prefill's groups take two neighbouring rows:
// each x vector feeds both rows' sums, so the loads of x, the larger operand there, are shared.
// Decode steps take rows from S far-apart places of the chunk: S read streams keep more of the
// weight bytes in flight than one (measured faster than one row at a time, `bench/matvec.py`).
template <int M, int PER, int S>
void nk_vnni_srows(const int16_t* xv, const float* xs, const int8_t* w, const float* scale, int64_t G, float* y,
                   int64_t K, int64_t N, const int64_t* rows) {
  constexpr int64_t XB = 32 * PER;
  const int8_t* r[S];
  const float* sr[S];
  for (int i = 0; i < S; ++i) r[i] = w + rows[i] * K, sr[i] = scale + rows[i] * G;
  const int64_t nb = K / XB, blocks_per_group = K / G / XB;
  __m512 acc[S][M];
  for (int i = 0; i < S; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
  int64_t g = 0, in_group = 0;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i t[S][M];
    for (int i = 0; i < S; ++i)
      for (int m = 0; m < M; ++m) t[i][m] = _mm512_setzero_si512();
    for (int j = 0; j < PER; ++j) {
      const int64_t k = b * XB + j * 32;
      __m512i wv[S];
      for (int i = 0; i < S; ++i) wv[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r[i] + k)));
      for (int m = 0; m < M; ++m) {
        const __m512i xm = _mm512_loadu_si512((const void*)(xv + m * K + k));
        for (int i = 0; i < S; ++i) t[i][m] = _mm512_dpwssd_epi32(t[i][m], wv[i], xm);
      }
    }
    for (int m = 0; m < M; ++m) {
      const float xb = xs[m * nb + b];
      for (int i = 0; i < S; ++i)
        acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[i][m]), _mm512_set1_ps(sr[i][g] * xb), acc[i][m]);
    }
    if (++in_group == blocks_per_group) in_group = 0, ++g;
  }
  for (int i = 0; i < S; ++i)
    for (int m = 0; m < M; ++m) y[m * N + rows[i]] = _mm512_reduce_add_ps(acc[i][m]);
}

template <int M, int PER>
void nk_vnni_2rows(const int16_t* xv, const float* xs, const int8_t* w, const float* scale, int64_t G, float* y,
                   int64_t K, int64_t N, int64_t n, int64_t n2) {
  const int64_t rows[2] = {n, n2};
  nk_vnni_srows<M, PER, 2>(xv, xs, w, scale, G, y, K, N, rows);
}

// Decode rows (M of x, 1 or 2) against weight rows [n0, n1) in S streams: the rows of each call come
// from S equal parts of the range, without software prefetch. Measured faster than one prefetched
// row at a time for every Gemma 3 shape, the tied lm_head most (`python -m bench.matvec --dtype int8`;
// figures in docs/performance.md).
template <int M, int PER, int S>
void nk_vnni_streams(const QuantizedX& xq, const int8_t* w, const float* scale, int64_t G, float* y,
                     int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t rest = jaxaccel::stream_rows<S>(n0, n1, [&](const int64_t* rows) {
    nk_vnni_srows<M, PER, S>(xq.q.data(), xq.s.data(), w, scale, G, y, K, N, rows);
  });
  for (int64_t n = rest; n < n1; ++n) nk_vnni_row<M, PER>(xq.q.data(), xq.s.data(), w, scale, G, y, K, N, n);
}

template <int PER>
void nk_vnni_rows(const QuantizedX& xq, const int8_t* w, const float* scale, int64_t G, float* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (M == 1) return nk_vnni_streams<1, PER, 4>(xq, w, scale, G, y, K, N, n0, n1);
  if (M == 2) return nk_vnni_streams<2, PER, 2>(xq, w, scale, G, y, K, N, n0, n1);
  int16_tiles<PER>(xq, y, M, K, N, n0, n1, [&](const int16_t* xv, const float* xs, float* ym, int64_t rows,
                                               int64_t b0, int64_t end) {
      int64_t n = b0;
      if (M > kVnniMaxRows)  // the prefill: two weight rows at a time
        for (; n + 2 <= end; n += 2) switch (rows) {
            case 1: nk_vnni_2rows<1, PER>(xv, xs, w, scale, G, ym, K, N, n, n + 1); break;
            case 2: nk_vnni_2rows<2, PER>(xv, xs, w, scale, G, ym, K, N, n, n + 1); break;
            case 3: nk_vnni_2rows<3, PER>(xv, xs, w, scale, G, ym, K, N, n, n + 1); break;
            default: nk_vnni_2rows<4, PER>(xv, xs, w, scale, G, ym, K, N, n, n + 1); break;
          }
      for (; n < end; ++n) switch (rows) {
          case 1: nk_vnni_row<1, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
          case 2: nk_vnni_row<2, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
          case 3: nk_vnni_row<3, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
          default: nk_vnni_row<4, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
        }
  });
}

void nk_vnni(const QuantizedX& xq, const int8_t* w, const float* scale, int64_t G, float* y, int64_t M, int64_t K,
             int64_t N, int64_t n0, int64_t n1) {
  switch (xq.block) {
    case 32: return nk_vnni_rows<1>(xq, w, scale, G, y, M, K, N, n0, n1);
    case 64: return nk_vnni_rows<2>(xq, w, scale, G, y, M, K, N, n0, n1);
    default: return nk_vnni_rows<4>(xq, w, scale, G, y, M, K, N, n0, n1);
  }
}
#endif

template <typename T>
void nk_chunk(const float* x, const QuantizedX& xq, const T* w, const float* scale, int64_t G, float* y,
              int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if constexpr (std::is_same<T, int8_t>::value) {
#ifdef JAXACCEL_VNNI
    if (xq.block) return nk_vnni(xq, w, scale, G, y, M, K, N, n0, n1);  // Run quantized x (UseVnni)
#endif
    if ((K / G) % kLanes == 0 && K / kLanes <= kMaxVectors) switch (M) {
        case 1: return nk_fixed<1>(x, w, scale, G, y, K, N, n0, n1);
        case 2: return nk_fixed<2>(x, w, scale, G, y, K, N, n0, n1);
        case 3: return nk_fixed<3>(x, w, scale, G, y, K, N, n0, n1);
        case 4: return nk_fixed<4>(x, w, scale, G, y, K, N, n0, n1);
        case 5: return nk_fixed<5>(x, w, scale, G, y, K, N, n0, n1);
        case 6: return nk_fixed<6>(x, w, scale, G, y, K, N, n0, n1);
        case 7: return nk_fixed<7>(x, w, scale, G, y, K, N, n0, n1);
        case 8: return nk_fixed<8>(x, w, scale, G, y, K, N, n0, n1);
      }
  }
  nk_generic(x, w, scale, G, y, M, K, N, n0, n1);
}
#elif defined(__AVX2__) && defined(__FMA__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_AVX2_INT16 1
// ---- AVX2, int8 [N, K]: x rounded to int16 per block of XB inputs (QuantizedX), 16 int8 weights
// sign-extended to int16 and multiplied with vpmaddwd (int32 sums of pairs) + vpaddd, one float
// multiply-add per block with scale[n, g] * x's block scale. Overflow: an int32 lane sums XB / 8
// <= 16 products of at most 127 * 32767 per block, far below 2^31.


template <int M, int PER>  // PER = XB / 32; xv, xs, y: M rows from the group's first
void nk_avx2_row(const int16_t* xv, const float* xs, const int8_t* w, const float* scale, int64_t G, float* y,
                 int64_t K, int64_t N, int64_t n) {
  const int8_t* row = w + n * K;
  prefetch_ahead(row, K, n, N);
  constexpr int64_t XB = 32 * PER;
  const int64_t nb = K / XB, blocks_per_group = K / G / XB;
  const float* sw = scale + n * G;
  __m256 acc[2][M];  // blocks alternate between two sums (the FMA's latency)
  for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
  int64_t g = 0, in_group = 0;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i t[M];
    for (int m = 0; m < M; ++m) t[m] = _mm256_setzero_si256();
    for (int j = 0; j < 2 * PER; ++j) {
      const int64_t k = b * XB + j * 16;
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(row + k)));
      for (int m = 0; m < M; ++m)
        t[m] = _mm256_add_epi32(t[m], _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i*)(xv + m * K + k))));
    }
    for (int m = 0; m < M; ++m)
      acc[b & 1][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[m]), _mm256_set1_ps(sw[g] * xs[m * nb + b]), acc[b & 1][m]);
    if (++in_group == blocks_per_group) in_group = 0, ++g;
  }
  for (int m = 0; m < M; ++m) y[m * N + n] = jaxaccel::hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
}

// One row of x against S weight rows from S far-apart places of the chunk (decode at batch 1),
// without software prefetch: as nk_vnni_streams on the VNNI path.
template <int PER, int S>
void nk_avx2_srows(const int16_t* xv, const float* xs, const int8_t* w, const float* scale, int64_t G, float* y,
                   int64_t K, const int64_t* rows) {
  constexpr int64_t XB = 32 * PER;
  const int64_t nb = K / XB, blocks_per_group = K / G / XB;
  __m256 acc[S];
  for (int i = 0; i < S; ++i) acc[i] = _mm256_setzero_ps();
  int64_t g = 0, in_group = 0;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i t[S];
    for (int i = 0; i < S; ++i) t[i] = _mm256_setzero_si256();
    for (int j = 0; j < 2 * PER; ++j) {
      const int64_t k = b * XB + j * 16;
      const __m256i xm = _mm256_loadu_si256((const __m256i*)(xv + k));
      for (int i = 0; i < S; ++i) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + rows[i] * K + k)));
        t[i] = _mm256_add_epi32(t[i], _mm256_madd_epi16(wv, xm));
      }
    }
    for (int i = 0; i < S; ++i)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[i]), _mm256_set1_ps(scale[rows[i] * G + g] * xs[b]), acc[i]);
    if (++in_group == blocks_per_group) in_group = 0, ++g;
  }
  for (int i = 0; i < S; ++i) y[rows[i]] = jaxaccel::hsum(acc[i]);
}

template <int PER>
void nk_avx2_rows(const QuantizedX& xq, const int8_t* w, const float* scale, int64_t G, float* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (M == 1) {  // S streams over S equal parts of [n0, n1)
    n0 = jaxaccel::stream_rows<4>(n0, n1, [&](const int64_t* rows) {
      nk_avx2_srows<PER, 4>(xq.q.data(), xq.s.data(), w, scale, G, y, K, rows);
    });
  }
  int16_tiles<PER>(xq, y, M, K, N, n0, n1, [&](const int16_t* xv, const float* xs, float* ym, int64_t rows,
                                               int64_t b0, int64_t end) {
      for (int64_t n = b0; n < end; ++n) switch (rows) {
          case 1: nk_avx2_row<1, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
          case 2: nk_avx2_row<2, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
          case 3: nk_avx2_row<3, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
          default: nk_avx2_row<4, PER>(xv, xs, w, scale, G, ym, K, N, n); break;
        }
  });
}

template <typename T>
void nk_chunk(const float* x, const QuantizedX& xq, const T* w, const float* scale, int64_t G, float* y,
              int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if constexpr (std::is_same<T, int8_t>::value) {
    if (xq.block == 32) return nk_avx2_rows<1>(xq, w, scale, G, y, M, K, N, n0, n1);
    if (xq.block == 64) return nk_avx2_rows<2>(xq, w, scale, G, y, M, K, N, n0, n1);
    if (xq.block == 128) return nk_avx2_rows<4>(xq, w, scale, G, y, M, K, N, n0, n1);
  }
  nk_generic(x, w, scale, G, y, M, K, N, n0, n1);
}
#else
template <typename T>
void nk_chunk(const float* x, const QuantizedX&, const T* w, const float* scale, int64_t G, float* y,
              int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  nk_generic(x, w, scale, G, y, M, K, N, n0, n1);
}
#endif

using Matrix = ffi::Buffer<ffi::F32, 2>;  // float32 [rows, cols]
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;

enum class WType { kF32, kBF16, kI8 };

struct Job {
  const float* x = nullptr;
  const void* w = nullptr;
  const float* scale = nullptr;
  float* y = nullptr;
  int64_t M = 0, K = 0, N = 0, G = 1, chunk = 1, n_chunks = 0;
  WType type = WType::kF32;
  bool kn = true;
  float* partial = nullptr;  // kn: [n_chunks - 1, M, N]: chunk c > 0 sums into block c - 1
  const QuantizedX* xq = nullptr;  // int8: x rounded to int16 for the VNNI path (block 0: not)

  template <typename T>
  void run(int64_t lo, int64_t hi, float* acc) const {
    const T* wt = static_cast<const T*>(w);
    if (kn) kn_chunk(x, wt, acc, M, K, N, lo, hi);
    else nk_chunk(x, *xq, wt, scale, G, y, M, K, N, lo, hi);
  }

  // Chunk c: kn sums its rows of W into its own partial (chunk 0 into y); nk writes its outputs.
  void operator()(int64_t c) const {
    const int64_t lo = c * chunk, hi = std::min(lo + chunk, kn ? K : N);
    float* acc = y;
    if (kn) {
      acc = c == 0 ? y : partial + (c - 1) * M * N;
      std::fill(acc, acc + M * N, 0.0f);
    }
    switch (type) {
      case WType::kF32: run<float>(lo, hi, acc); break;
      case WType::kBF16: run<uint16_t>(lo, hi, acc); break;
      case WType::kI8: run<int8_t>(lo, hi, acc); break;
    }
  }
};

// Checks w (and scale [N, G]) against x [M, K] and fills job's shape, type and pointers (not its chunks).
ffi::Error Describe(Job& job, const float* x, int64_t M, int64_t K, ffi::AnyBuffer& w, const float* scale,
                    int64_t G, float* y, int64_t w_in_axis) {
  auto wd = w.dimensions();
  if (wd.size() != 2 || (w_in_axis != 0 && w_in_axis != 1))
    return ffi::Error::InvalidArgument("jaxaccel matvec: w must be 2-D and w_in_axis 0 or 1");
  job.kn = w_in_axis == 0;
  const int64_t N = job.kn ? wd[1] : wd[0];
  if ((job.kn ? wd[0] : wd[1]) != K || M < 1)
    return ffi::Error::InvalidArgument("jaxaccel matvec: x [M, K] and w do not match");
  switch (w.element_type()) {
    case ffi::DataType::F32: job.type = WType::kF32; break;
    case ffi::DataType::BF16: job.type = WType::kBF16; break;
    case ffi::DataType::S8: job.type = WType::kI8; break;
    default: return ffi::Error::InvalidArgument("jaxaccel matvec: weights must be float32, bfloat16 or int8");
  }
  if ((job.type == WType::kI8) != (scale != nullptr) || (scale && (job.kn || G < 1 || K % G)))
    return ffi::Error::InvalidArgument("jaxaccel matvec: int8 weights need [N, K] layout and scales [N, G], G | K");
  job.x = x; job.w = w.untyped_data(); job.scale = scale; job.G = G; job.y = y;
  job.M = M; job.K = K; job.N = N;
  return ffi::Error::Success();
}

// The block of inputs x is rounded to int16 in for job (0: the float paths).
int64_t BlockFor(const Job& job) {
  int64_t block = 0;
#if defined(JAXACCEL_VNNI) || defined(JAXACCEL_AVX2_INT16)
  if (job.type == WType::kI8) block = QuantizedX::block_for(job.K / job.G);
#endif
#ifdef JAXACCEL_VNNI
  // 5..8 rows (batched decode): widening measured faster for short rows or blocks of 32
  // (Gemma 3's grouped lm_head), the VNNI path for rows of 1024+ inputs in blocks of 64+
  // (its 2048-input down_proj)
  if (job.type == WType::kI8 && job.M > kVnniMaxRows && job.M <= kWidenMaxRows && (job.K < 1024 || block < 64))
    block = 0;
#endif
  return block;
}

// Pool threads besides the caller for weights of `bytes` in all against M rows of x.
int64_t HelpersFor(ffi::ThreadPool& pool, size_t bytes, int64_t M) {
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, jaxaccel::kMaxHelpers);
  if (bytes < (128 << 10) && M <= kMaxRows) helpers = 0;  // too small to pay for a hand-off
  return helpers;
}

// x rounded to int16 in blocks of `block` (block 0: nothing to do).
void QuantizeX(ffi::ThreadPool& pool, QuantizedX& xq, const float* x, int64_t M, int64_t K, int64_t block,
               int64_t helpers) {
  xq.prepare(M, K, block);
  if (block && M <= kVnniMaxRows)
    for (int64_t m = 0; m < M; ++m) xq.quantize_row(x, K, m);
  else if (block)  // prefill's rows
    jaxaccel::parallel_for(pool, M, helpers, [&](int64_t m) { xq.quantize_row(x, K, m); });
}

// Cuts job's extent into chunks for helpers + 1 participants. nk: several chunks per participant,
// so a late starter still helps. kn: each chunk costs a partial [M, N] to zero and add, so about
// two per participant.
void SetChunks(Job& job, int64_t helpers) {
  const int64_t extent = job.kn ? job.K : job.N;
  const int64_t parts = (std::max<int64_t>(helpers, 0) + 1) * (job.kn ? 2 : 8);
  job.chunk = std::max<int64_t>(job.kn ? 8 : 32, (extent + parts - 1) / parts);
  job.n_chunks = (extent + job.chunk - 1) / job.chunk;
}

ffi::Error Run(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, ffi::AnyBuffer& w,
               const float* scale, int64_t G, float* y, int64_t w_in_axis) {
  Job job;
  if (auto e = Describe(job, x, M, K, w, scale, G, y, w_in_axis); e.failure()) return e;
  const int64_t block = BlockFor(job);
  if (M > kMaxRows && block == 0)
    return ffi::Error::InvalidArgument("jaxaccel matvec: more than 16 rows need int8 weights, K / G a multiple of 32 "
                                       "and an AVX-512 VNNI or AVX2 build (kernels.int8_path())");
  const int64_t helpers = HelpersFor(pool, w.size_bytes(), M);
  QuantizedX xq;
  QuantizeX(pool, xq, x, M, K, block, helpers);
  job.xq = &xq;
  SetChunks(job, helpers);
  std::vector<float> partial(job.kn && job.n_chunks > 1 ? size_t(job.n_chunks - 1) * M * job.N : 0);
  job.partial = partial.data();
  jaxaccel::parallel_for(pool, job.n_chunks, helpers, job);
  for (int64_t c = 1; job.kn && c < job.n_chunks; ++c) {  // fixed order: deterministic sums
    const float* p = partial.data() + (c - 1) * M * job.N;
    for (int64_t i = 0; i < M * job.N; ++i) y[i] += p[i];
  }
  return ffi::Error::Success();
}

// Several int8 weights [N_i, K] (scales [N_i, G_i]) times the same x [M, K], in one call: a
// layer's q / k / v or gate / up projections. Each output is what Run computes for its weight,
// bit for bit (same blocks of x, same chunks' code); the pool is handed the chunks of all the
// weights at once, where separate calls each paid a hand-off and a wait for the slowest thread.
ffi::Error MatvecScaledMany(ffi::ThreadPool pool, Matrix x, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], n = int64_t(rets.size());
  if (n < 1 || int64_t(args.size()) != 2 * n)
    return ffi::Error::InvalidArgument("jaxaccel matvec_many: needs (weight, scale) pairs and one result each");
  std::vector<Job> jobs(static_cast<size_t>(n));
  std::vector<size_t> sizes(static_cast<size_t>(n));
  size_t bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto w = args.get<ffi::AnyBuffer>(2 * i);
    auto s = args.get<Matrix>(2 * i + 1);
    auto y = rets.get<Matrix>(i);
    if (w.has_error() || s.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("jaxaccel matvec_many: arguments must be int8 weights with float32 scales");
    if (w->element_type() != ffi::DataType::S8 || s->dimensions()[0] != w->dimensions()[0])
      return ffi::Error::InvalidArgument("jaxaccel matvec_many: weights must be int8 [N, K] with scales [N, G]");
    if (auto e = Describe(jobs[i], x.typed_data(), M, K, *w, s->typed_data(), s->dimensions()[1],
                          (*y)->typed_data(), 1); e.failure())
      return e;
    if (M > kMaxRows && BlockFor(jobs[i]) == 0)
      return ffi::Error::InvalidArgument("jaxaccel matvec_many: more than 16 rows need K / G a multiple of 32 and "
                                         "an AVX-512 VNNI or AVX2 build (kernels.int8_path())");
    sizes[i] = w->size_bytes();
    bytes += sizes[i];
  }
  const int64_t helpers = HelpersFor(pool, bytes, M);
  QuantizedX xq[4];  // x rounded once per block size in use: none (float path), 32, 64, 128
  bool rounded[4] = {false, false, false, false};
  std::vector<int64_t> first(size_t(n) + 1, 0);  // chunks of jobs before job i
  for (int64_t i = 0; i < n; ++i) {
    const int64_t block = BlockFor(jobs[i]), slot = block == 0 ? 0 : block == 32 ? 1 : block == 64 ? 2 : 3;
    if (!rounded[slot]) QuantizeX(pool, xq[slot], x.typed_data(), M, K, block, helpers);
    rounded[slot] = true;
    jobs[i].xq = &xq[slot];
    SetChunks(jobs[i], HelpersFor(pool, sizes[i], M));  // cut as a call of its own would cut it: same sums
    first[i + 1] = first[i] + jobs[i].n_chunks;
  }
  jaxaccel::parallel_for(pool, first[n], helpers, [&](int64_t c) {
    const int64_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    jobs[i](c - first[i]);
  });
  return ffi::Error::Success();
}

ffi::Error Matvec(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer w, MatrixOut y, int64_t w_in_axis) {
  auto xd = x.dimensions();
  return Run(pool, x.typed_data(), xd[0], xd[1], w, nullptr, 1, y->typed_data(), w_in_axis);
}

ffi::Error MatvecScaled(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer w, Matrix scale,
                        MatrixOut y) {
  auto xd = x.dimensions(), sd = scale.dimensions();
  if (sd[0] != w.dimensions()[0])
    return ffi::Error::InvalidArgument("jaxaccel matvec: scales must be [N, G] for weights [N, K]");
  return Run(pool, x.typed_data(), xd[0], xd[1], w, scale.typed_data(), sd[1], y->typed_data(), 1);
}

}  // namespace

// How int8 weights are multiplied in this build: 2 = x rounded to int16, AVX-512 VNNI (vpdpwssd);
// 1 = x rounded to int16, AVX2 (vpmaddwd); 0 = widened to float32
extern "C" int JaxaccelInt8Path() {
#if defined(JAXACCEL_VNNI)
  return 2;
#elif defined(JAXACCEL_AVX2_INT16)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("w_in_axis"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelMatvecScaled, MatvecScaled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelMatvecScaledMany, MatvecScaledMany,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .RemainingArgs()
                                  .RemainingRets());


