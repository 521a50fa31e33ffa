// jaxaccel CPU kernel: the greedy token of each row of logits, jnp.argmax's answer (the first
// maximum; the first NaN where a row has one), in two vectorized passes over the row.
//
// Why: a greedy decode step takes the argmax of 262144 float32 logits (Gemma 3). XLA's CPU
// backend runs argmax's (value, index) reduction element by element, and sampling.argmax's plain
// reductions (a max, a NaN test, a min over the indices that hold it) become several trees of
// small reduce-window loops, each pass over the whole row.
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && !defined(JAXACCEL_GENERIC)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX2__) && !defined(JAXACCEL_GENERIC)
// 8 lanes at a time. _mm256_max_ps(v, top) returns top where v is NaN, so a NaN never becomes
// the maximum; NaNs are noted apart (an unordered compare of v with itself).
int64_t RowArgmax(const float* x, int64_t V) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    top = _mm256_max_ps(v, top);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float best = lanes[0];
  for (int j = 1; j < 8; ++j) best = lanes[j] > best ? lanes[j] : best;
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t k = i; k < V; ++k) best = x[k] > best ? x[k] : best, any_nan |= x[k] != x[k];
  // the first index holding a NaN (if any) or the maximum (all -inf: index 0)
  const __m256 b = _mm256_set1_ps(best);
  for (i = 0; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const int hits = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, b, _CMP_EQ_OQ));
    if (hits) return i + __builtin_ctz(hits);
  }
  for (; i < V; ++i)
    if (any_nan ? x[i] != x[i] : x[i] == best) return i;
  return 0;
}
#else
int64_t RowArgmax(const float* x, int64_t V) {  // one value at a time
  float best = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int64_t i = 0; i < V; ++i) best = x[i] > best ? x[i] : best, any_nan |= x[i] != x[i];
  for (int64_t i = 0; i < V; ++i)
    if (any_nan ? x[i] != x[i] : x[i] == best) return i;
  return 0;
}
#endif

using Logits = ffi::Buffer<ffi::F32, 2>;  // (aliases: a comma inside the handler macro splits its arguments)
using TokenIds = ffi::Buffer<ffi::S32, 1>;
using Tokens = ffi::Result<TokenIds>;

ffi::Error Argmax(Logits logits, Tokens out) {
  const auto d = logits.dimensions();
  const int64_t R = d[0], V = d[1];
  if (out->dimensions()[0] != R || V < 1)
    return ffi::Error::InvalidArgument("jaxaccel argmax: logits [R, V >= 1] and out [R]");
  for (int64_t r = 0; r < R; ++r) out->typed_data()[r] = int32_t(RowArgmax(logits.typed_data() + r * V, V));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelArgmax, Argmax, ffi::Ffi::Bind().Arg<Logits>().Ret<TokenIds>());
