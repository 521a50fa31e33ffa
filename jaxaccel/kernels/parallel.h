// jaxaccel CPU kernels: work sharing over XLA's intra-op thread pool, and the widening of stored
// weight / cache values to float32 that the kernels share.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxaccel {

constexpr int kMaxHelpers = 7;  // pool tasks besides the caller

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return float(v); }
inline float widen(uint16_t v) {  // bfloat16 bits -> float32
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Runs body(c) for every c in [0, n) on the calling thread and up to `helpers` pool threads,
// which take indices from one atomic counter; returns when all n are done. The caller works
// too and then only waits for indices already taken, never for a pool task that has not
// started, so a busy pool cannot deadlock it. A pool task that starts after the caller has
// returned finds no index left and touches nothing but the shared counter.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t helpers, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const Body* body = nullptr;
    void work() {
      for (;;) {
        const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= n) return;
        (*body)(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->body = &body;
  helpers = std::max<int64_t>(0, std::min<int64_t>(helpers, n - 1));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->work(); });
  state->work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// The decode kernels' read streams: calls body(rows) with S weight rows, one from each of S equal
// parts of [n0, n1), for every position in a part (several read streams in flight, see
// docs/cpu-kernels.md); returns the first row left over (n1 - n0 not a multiple of S).
template <int S, typename Body>
int64_t stream_rows(int64_t n0, int64_t n1, const Body& body) {
  const int64_t part = (n1 - n0) / S;
  for (int64_t i = 0; i < part; ++i) {
    int64_t rows[S];
    for (int j = 0; j < S; ++j) rows[j] = n0 + j * part + i;
    body(rows);
  }
  return n0 + S * part;
}

}  // namespace jaxaccel
