// jaxaccel CPU int8 GEMM for dynamic-range int8 encoders (QuantConfig(mode="w8a8")): many rows
// (sentences x tokens) times an int8 weight W [N, K] with one float32 scale per output channel
// (sw [N, 1]), x quantized per row (token) in the call exactly as AQT's serving dot does it
// (quant._aqt_dot):
//   sx[m]   = max_k |x[m, k]| * (1 / 127.5)     (a row of zeros: 1 / 127.5)
//   q[m, k] = round-half-even(clip(x[m, k] * (1 / sx[m]), -127, 127))
//   y[m, n] = (float(sum_k q[m, k] W[n, k]) * sx[m]) * sw[n]
// The sums are exact int32 (K <= kMaxK), so y equals AQT's dot as XLA computes it. A row holding
// a NaN or an infinity gives NaN outputs.
//
// Why: XLA compiles AQT's dot into a quantizing pass over x, an int8 GEMM (YNNPACK's in current
// jaxlib) and a scaling pass; this call does all three, on AMX tiles where the CPU has them.
//
// How: W is packed per call into blocks of kNR outputs, kKU inputs of one output side by side,
// so one vector load holds kKU inputs of 16 (AVX-512) or 8 (AVX2) outputs; a tile of kMR rows x
// kNR outputs keeps its sums in registers while one kKU-input group of x per row is broadcast
// against the block.
//  - AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so x's codes are stored + 128
//    (uint8) and 128 * sum_k W[n, k] is taken off each output afterwards (exact in int32).
//  - AMX (AVX-512 builds on CPUs with AMX-INT8, where Linux grants the tile registers): the same
//    packed blocks are AMX B tiles (16 input groups x 16 outputs, rows 256 bytes apart), x's codes
//    A tiles of 16 rows x 64 inputs (K padded to 64, rows to 16 with zero codes); tdpbusd sums
//    32 rows x 32 outputs per step into four int32 tiles. Build with -DJAXACCEL_NO_AMX
//    ($JAXACCEL_CPU_KERNEL_FLAGS) to run the VNNI tiles there instead.
//  - AVX2: codes widened to int16 pairs meet vpmaddwd, which sums each pair of products into
//    int32 (vpmaddubsw on the bytes would saturate its int16 sums).
//  - portable: one int32 dot product per output, on W as stored.
// Threads: chunks of rows x groups of output blocks, shared by the caller and XLA's pool
// (parallel.h); quantizing x and packing W are split the same way first.
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
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxK = 65536;    // inputs: 255 * 127 * kMaxK (+ padding) stays below 2^31
constexpr int64_t kRowChunk = 96;   // rows of x per work item (a multiple of every kMR)

// x[m, :] -> its codes, stored through `code` (below) into out[0, K), and its scale; NaN for a
// row with a NaN or an infinity (codes 0). Written so that GCC vectorizes both loops: the largest
// |x| as the largest bit pattern with the sign cleared (the same order for finite floats; NaN and
// infinity sort above every finite value), the clamp as plain comparisons (x * inv is finite).
template <typename C, typename Code>
float quantize_row(const float* x, int64_t K, C* out, Code code) {
  uint32_t top_bits = 0;
  for (int64_t k = 0; k < K; ++k) {
    uint32_t bits;
    std::memcpy(&bits, x + k, 4);
    top_bits = std::max(top_bits, bits & 0x7FFFFFFFu);
  }
  if (top_bits >= 0x7F800000u) {
    for (int64_t k = 0; k < K; ++k) out[k] = code(0);
    return std::numeric_limits<float>::quiet_NaN();
  }
  float top;
  std::memcpy(&top, &top_bits, 4);
  // AQT divides by 127.5; XLA's simplifier turns that into a product with the float 1 / 127.5
  const float sx = (top == 0.0f ? 1.0f : top) * (1.0f / 127.5f);
  float inv = 1.0f / sx;
  if (std::isinf(inv)) inv = 1.0f;  // as AQT: a subnormal scale's reciprocal overflows
  for (int64_t k = 0; k < K; ++k) {
    float v = x[k] * inv;
    v = v < -127.0f ? -127.0f : v;
    v = v > 127.0f ? 127.0f : v;
    out[k] = code(int8_t(int32_t(std::nearbyint(v))));  // round half to even (the default rounding mode)
  }
  return sx;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_W8A8_PATH 2
using Code = uint8_t;     // x's codes + 128
using Lane = int8_t;      // packed W
constexpr int kMR = 6, kNR = 64, kKU = 4;
inline Code code(int8_t q) { return Code(int(q) + 128); }
constexpr int32_t kOffset = 128;
constexpr int64_t kKAlign = 64, kRowAlign = 16;  // whole AMX tiles: 64 inputs, 16 rows (zero codes past them)

template <int R>
void tile(const Code* x, int64_t Kp, const Lane* b, const int32_t* off, const float* sx, const float* sw, float* y,
          int64_t N, int64_t n0) {
  // (every loop over r and p unrolled: GCC keeps the sums in registers only when no index varies)
  __m512i acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t g = 0; g < Kp / kKU; ++g) {
    const Lane* bg = b + g * kNR * kKU;
    const __m512i b0 = _mm512_loadu_si512(bg), b1 = _mm512_loadu_si512(bg + 64), b2 = _mm512_loadu_si512(bg + 128),
                  b3 = _mm512_loadu_si512(bg + 192);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * Kp + g * kKU, 4);
      const __m512i a = _mm512_set1_epi32(four);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], a, b3);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const int64_t n = n0 + 16 * p;
    if (n >= N) continue;
    const __mmask16 mask = N - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
    const __m512i o = _mm512_loadu_si512(off + n);
    const __m512 s = _mm512_loadu_ps(sw + n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], o));
      _mm512_mask_storeu_ps(y + r * N + n, mask, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(sx[r])), s));
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && !defined(JAXACCEL_NO_AMX)
#define JAXACCEL_W8A8_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

// Linux gives a process AMX's tile registers only once it asks (arch_prctl); a kernel that
// refuses leaves the VNNI tiles in use.
bool amx_usable() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: tiles 0-3 the int32 sums of 32 rows x 32 outputs, 4-5 x's codes
// of rows r..r+15 and r+16..r+31 (64 inputs), 6-7 the packed W of 16 input groups x 16 outputs.
void amx_configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// The int32 sums of rows [m, m + 16 * A) (x padded to whole tiles) x the 32 outputs of half h of
// block `b`, stored to c (row stride ldc int32).
template <int A>
void amx_tile(const Code* x, int64_t Kp, const Lane* b, int h, int32_t* c, int64_t ldc) {
  _tile_zero(0);
  _tile_zero(1);
  if (A == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < Kp; k += 64) {
    const Lane* bk = b + (k / kKU) * kNR * kKU + 2 * h * 16 * kKU;
    _tile_loadd(4, x + k, Kp);
    _tile_loadd(6, bk, kNR * kKU);
    _tile_loadd(7, bk + 16 * kKU, kNR * kKU);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if (A == 2) {
      _tile_loadd(5, x + 16 * Kp + k, Kp);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  if (A == 2) {
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
  }
}

// y for `rows` rows x the outputs [n0, n0 + kNR) of one block from their int32 sums c [rows, kNR].
void amx_outputs(const int32_t* c, int64_t rows, const int32_t* off, const float* sx, const float* sw, float* y,
                 int64_t N, int64_t n0) {
  for (int p = 0; p < kNR / 16; ++p) {
    const int64_t n = n0 + 16 * p;
    if (n >= N) continue;
    const __mmask16 mask = N - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
    const __m512i o = _mm512_loadu_si512(off + n);
    const __m512 s = _mm512_loadu_ps(sw + n);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(c + r * kNR + 16 * p), o));
      _mm512_mask_storeu_ps(y + r * N + n, mask, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(sx[r])), s));
    }
  }
}
#endif
#elif defined(__AVX2__) && !defined(JAXACCEL_GENERIC)
#define JAXACCEL_W8A8_PATH 1
using Code = int16_t;
using Lane = int16_t;
constexpr int kMR = 6, kNR = 16, kKU = 2;
inline Code code(int8_t q) { return Code(q); }
constexpr int32_t kOffset = 0;
constexpr int64_t kKAlign = kKU, kRowAlign = 1;

template <int R>
void tile(const Code* x, int64_t Kp, const Lane* b, const int32_t*, const float* sx, const float* sw, float* y,
          int64_t N, int64_t n0) {
  __m256i acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < Kp / kKU; ++g) {
    const Lane* bg = b + g * kNR * kKU;
    const __m256i b0 = _mm256_loadu_si256((const __m256i*)bg), b1 = _mm256_loadu_si256((const __m256i*)(bg + 16));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t two;
      std::memcpy(&two, x + r * Kp + g * kKU, 4);
      const __m256i a = _mm256_set1_epi32(two);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(a, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(a, b1));
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p) {
    const int64_t n = n0 + 8 * p;
    if (n >= N) continue;
    const __m256 s = _mm256_loadu_ps(sw + n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      alignas(32) float out[8];
      _mm256_store_ps(out, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][p]), _mm256_set1_ps(sx[r])), s));
      std::memcpy(y + r * N + n, out, sizeof(float) * size_t(std::min<int64_t>(8, N - n)));
    }
  }
}
#else
#define JAXACCEL_W8A8_PATH 0
using Code = int8_t;
using Lane = int8_t;
constexpr int kMR = 6, kNR = 16, kKU = 1;
inline Code code(int8_t q) { return q; }
constexpr int32_t kOffset = 0;
constexpr int64_t kKAlign = kKU, kRowAlign = 1;

// Portable: W's block packed as kNR rows of Kp inputs (its own layout), one int32 dot per output.
template <int R>
void tile(const Code* x, int64_t Kp, const Lane* b, const int32_t*, const float* sx, const float* sw, float* y,
          int64_t N, int64_t n0) {
  for (int r = 0; r < R; ++r)
    for (int64_t o = 0; o < kNR && n0 + o < N; ++o) {
      int32_t t = 0;
      for (int64_t k = 0; k < Kp; ++k) t += int32_t(x[r * Kp + k]) * int32_t(b[o * Kp + k]);
      y[r * N + n0 + o] = (float(t) * sx[r]) * sw[n0 + o];
    }
}
#endif

// One call's operands: x's codes [M, Kp] with their scales, W packed per block of kNR outputs
// ([K / kKU groups][kNR outputs][kKU inputs], zeros past K and N), the per-output offset
// (kOffset * sum_k W[n, k]) and sw, both padded to whole blocks.
struct Operands {
  int64_t M = 0, K = 0, Kp = 0, N = 0, blocks = 0;
  std::vector<Code> x;
  std::vector<float> sx, sw;
  std::vector<Lane> b;
  std::vector<int32_t> off;

  Operands(int64_t M_, int64_t K_, int64_t N_) : M(M_), K(K_), Kp((K_ + kKAlign - 1) / kKAlign * kKAlign), N(N_) {
    blocks = (N + kNR - 1) / kNR;
    const int64_t rows = (M + kRowAlign - 1) / kRowAlign * kRowAlign;
    x.assign(size_t(rows * Kp), code(0));
    sx.assign(size_t(rows), 0.0f);
    sw.assign(size_t(blocks * kNR), 0.0f);
    b.assign(size_t(blocks * kNR * Kp), Lane(0));
    off.assign(size_t(blocks * kNR), 0);
  }

  void quantize(const float* xs, int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) sx[m] = quantize_row(xs + m * K, K, x.data() + m * Kp, code);
  }

  void pack(const int8_t* w, const float* scale, int64_t block) {
    Lane* out = b.data() + block * kNR * Kp;
    for (int64_t o = 0; o < kNR; ++o) {
      const int64_t n = block * kNR + o;
      if (n >= N) break;
      const int8_t* row = w + n * K;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        sum += row[k];
        out[(kKU == 1) ? o * Kp + k : (k / kKU) * kNR * kKU + o * kKU + k % kKU] = Lane(row[k]);
      }
      off[n] = kOffset * sum;
      sw[n] = scale[n];
    }
  }

  // rows [m0, m1) x output blocks [j0, j1)
  void multiply(float* y, int64_t m0, int64_t m1, int64_t j0, int64_t j1) const {
#ifdef JAXACCEL_W8A8_AMX
    if (amx_usable()) {
      alignas(64) int32_t c[32 * kNR];  // the sums of 32 rows x one block
      amx_configure();
      for (int64_t m = m0; m < m1; m += 32)
        for (int64_t j = j0; j < j1; ++j) {
          const Lane* bj = b.data() + j * kNR * Kp;
          for (int h = 0; h < 2; ++h) {
            if (m1 - m > 16) amx_tile<2>(x.data() + m * Kp, Kp, bj, h, c + 32 * h, kNR);
            else amx_tile<1>(x.data() + m * Kp, Kp, bj, h, c + 32 * h, kNR);
          }
          amx_outputs(c, std::min<int64_t>(32, m1 - m), off.data(), sx.data() + m, sw.data(), y + m * N, N, j * kNR);
        }
      _tile_release();
      return;
    }
#endif
    // a few tiles of rows at a time against every block: y's rows are written front to back (a
    // block's columns of all the chunk's rows, 6 KB apart, wrote several times slower once y
    // outgrew the caches), and a block is read for several tiles.
    constexpr int64_t kRowGroup = 4 * kMR;
    for (int64_t mg = m0; mg < m1; mg += kRowGroup)
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t m = mg; m < std::min(m1, mg + kRowGroup); m += kMR) {
          const Code* xm = x.data() + m * Kp;
          const Lane* bj = b.data() + j * kNR * Kp;
          const int32_t* o = off.data();
          float* ym = y + m * N;
          switch (std::min<int64_t>(kMR, m1 - m)) {
            case 1: tile<1>(xm, Kp, bj, o, sx.data() + m, sw.data(), ym, N, j * kNR); break;
            case 2: tile<2>(xm, Kp, bj, o, sx.data() + m, sw.data(), ym, N, j * kNR); break;
            case 3: tile<3>(xm, Kp, bj, o, sx.data() + m, sw.data(), ym, N, j * kNR); break;
            case 4: tile<4>(xm, Kp, bj, o, sx.data() + m, sw.data(), ym, N, j * kNR); break;
            case 5: tile<5>(xm, Kp, bj, o, sx.data() + m, sw.data(), ym, N, j * kNR); break;
            default: tile<kMR>(xm, Kp, bj, o, sx.data() + m, sw.data(), ym, N, j * kNR); break;
          }
        }
  }
};

using Matrix = ffi::Buffer<ffi::F32, 2>;
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;
using Codes = ffi::Buffer<ffi::S8, 2>;  // (aliases: a comma inside the handler macro splits its arguments)

ffi::Error W8a8(ffi::ThreadPool pool, Matrix x, Codes w, Matrix scale, MatrixOut y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (wd[1] != K || sd[0] != N || sd[1] != 1 || K < 1 || K > kMaxK)
    return ffi::Error::InvalidArgument("jaxaccel w8a8: needs x [M, K], w int8 [N, K] and scale [N, 1], "
                                       "1 <= K <= 65536 (kernels.w8a8.wants)");
  if (M == 0 || N == 0) return ffi::Error::Success();
  Operands ops(M, K, N);
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, jaxaccel::kMaxHelpers);
  if (M * N * K < (int64_t(1) << 21)) helpers = 0;  // too small to pay for a hand-off
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  // first quantize x (per chunk of rows) and pack W (per block) ...
  jaxaccel::parallel_for(pool, row_chunks + ops.blocks, helpers, [&](int64_t c) {
    if (c < row_chunks) ops.quantize(xp, c * kRowChunk, std::min(M, (c + 1) * kRowChunk));
    else ops.pack(wp, sp, c - row_chunks);
  });
  // ... then multiply: rows x groups of output blocks, several work items per participant
  const int64_t groups = std::min(ops.blocks, std::max<int64_t>(1, (4 * (helpers + 1) + row_chunks - 1) / row_chunks));
  const int64_t per_group = (ops.blocks + groups - 1) / groups;
  jaxaccel::parallel_for(pool, row_chunks * groups, helpers, [&](int64_t c) {
    const int64_t rc = c / groups, g = c % groups;
    ops.multiply(yp, rc * kRowChunk, std::min(M, (rc + 1) * kRowChunk), g * per_group,
                 std::min(ops.blocks, (g + 1) * per_group));
  });
  return ffi::Error::Success();
}

}  // namespace

// How this build multiplies w8a8: 3 = AMX, 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable
extern "C" int JaxaccelW8a8Path() {
#ifdef JAXACCEL_W8A8_AMX
  if (amx_usable()) return 3;
#endif
  return JAXACCEL_W8A8_PATH;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelW8a8, W8a8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Codes>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>());
