// jaxaccel CPU kernels: the softmax arithmetic the attention kernels share (attention.cc,
// decode_attention.cc).
#pragma once

#include <cstdint>
#include <cstring>

namespace jaxaccel {

// e^x for x <= 0 (softmax scores minus their max): 2^n * e^r with |r| <= ln2 / 2 and a degree-6
// Taylor polynomial (relative error ~2e-7), written so that a loop of it vectorizes.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // e^-87 ~ 1.6e-38: 2^n stays a normal float; NaN stays NaN
  // n = round(x / ln2): adding and subtracting 1.5 * 2^23 rounds to an integer (|x / ln2| < 2^22),
  // and unlike std::floor it lets GCC vectorize the loop
  constexpr float kLog2e = 1.44269504088896341f;  // 1 / ln2
  const float n = (x * kLog2e + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // ln2 in two parts
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline float round_bf16(float x) {  // nearest even, as XLA's float32 -> bfloat16 (NaN stays NaN)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return x;
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

}  // namespace jaxaccel
