// jaxaccel CPU kernels: the vector helpers several kernels share (x86 builds with AVX2 or
// AVX-512; a portable build, -DJAXACCEL_GENERIC, has none).
#pragma once

#if (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))) && !defined(JAXACCEL_GENERIC)
#include <immintrin.h>

namespace jaxaccel {

// the sum of a vector's float32 lanes
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

}  // namespace jaxaccel
#endif
