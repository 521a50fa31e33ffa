// jaxaccel CPU kernel: the greedy token of each row of logits, jnp.argmax's answer (the first
// maximum; the first NaN where a row has one), in two vectorized passes over the row.
//
// Why: a greedy decode step takes the argmax of 262144 float32 logits (Gemma 3). XLA's CPU
// backend runs argmax's (value, index) reduction element by element, and sampling.argmax's plain
// reductions (a max, a NaN test, a min over the indices that hold it) become several trees of
// small reduce-window loops, each pass over the whole row.
#include <cstdint>
#include <limits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // independent lanes: GCC turns each loop below into vector code

// The first index in [0, V) whose value `hit` accepts, scanning kLanes values at a time.
template <typename Hit>
int64_t FirstHit(const float* x, int64_t V, const Hit& hit) {
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    int any = 0;
    for (int j = 0; j < kLanes; ++j) any |= hit(x[i + j]);
    if (any) break;
  }
  for (; i < V; ++i)
    if (hit(x[i])) return i;
  return 0;  // unreachable for the values RowArgmax looks for
}

int64_t RowArgmax(const float* x, int64_t V) {
  float top[kLanes];
  int nan[kLanes];
  for (int j = 0; j < kLanes; ++j) top[j] = -std::numeric_limits<float>::infinity(), nan[j] = 0;
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = x[i + j];
      top[j] = v > top[j] ? v : top[j];  // a NaN never wins a comparison: counted apart
      nan[j] |= v != v;
    }
  float best = -std::numeric_limits<float>::infinity();
  int any_nan = 0;
  for (int j = 0; j < kLanes; ++j) best = top[j] > best ? top[j] : best, any_nan |= nan[j];
  for (; i < V; ++i) best = x[i] > best ? x[i] : best, any_nan |= x[i] != x[i];
  if (any_nan) return FirstHit(x, V, [](float v) { return int(v != v); });
  return FirstHit(x, V, [best](float v) { return int(v == best); });  // all -inf: index 0
}

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
