// jaxaccel CPU kernel: rows of an embedding table, out[i, :] = table[ids[i], :], copied as bytes.
//
// Why: for a bfloat16 table, XLA's CPU backend gathers from a float32 (or, bit-cast, uint16) copy
// of the whole table, and inside the decode loop it hoists that copy out of the loop: every
// generate call wrote a new 671 MB copy of Gemma 3's 262k x 640 table before its first token.
// This kernel reads only the rows asked for. Ids follow jnp.take: a negative id counts from the
// end (once), and one still outside [0, V) gives a row of 0xFF bytes (NaN in float32 and
// bfloat16), as jnp.take's default fill gives NaN.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Ids = ffi::Buffer<ffi::S32, 1>;

ffi::Error TakeRows(ffi::AnyBuffer table, Ids ids, ffi::Result<ffi::AnyBuffer> out) {
  auto td = table.dimensions(), od = out->dimensions();
  const int64_t n = ids.dimensions()[0];
  if (td.size() != 2 || od.size() != 2 || od[0] != n || od[1] != td[1] ||
      out->element_type() != table.element_type())
    return ffi::Error::InvalidArgument("jaxaccel take_rows: table [V, D], ids [n] and out [n, D] of the table's type");
  const int64_t V = td[0];
  const size_t row = table.size_bytes() / (V > 0 ? V : 1);
  const char* src = static_cast<const char*>(table.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = id[i] < 0 ? id[i] + V : id[i];  // a negative id counts from the end once
    if (r >= 0 && r < V) std::memcpy(dst + i * row, src + r * row, row);
    else std::memset(dst + i * row, 0xFF, row);
  }
  return ffi::Error::Success();
}

// buf [B, S, ...] <- new [B, T, ...] at slots index[b] .. index[b] + T - 1 of row b, in place
// (out aliases buf). Starts are clamped to [0, S - T] as lax.dynamic_update_slice clamps them.
ffi::Error WriteRows(ffi::AnyBuffer buf, ffi::AnyBuffer rows, Ids index, ffi::Result<ffi::AnyBuffer> out) {
  auto bd = buf.dimensions(), rd = rows.dimensions();
  const bool same_tail = bd.size() == rd.size() && bd.size() >= 2 &&
                         std::equal(bd.begin() + 2, bd.end(), rd.begin() + 2);
  if (!same_tail || rd[0] != bd[0] || rd[1] > bd[1] || index.dimensions()[0] != bd[0] ||
      rows.element_type() != buf.element_type() || out->untyped_data() != buf.untyped_data())
    return ffi::Error::InvalidArgument("jaxaccel write_rows: buf [B, S, ...], rows [B, T, ...] (T <= S) of its type, index [B], out aliasing buf");
  const int64_t B = bd[0], S = bd[1], T = rd[1];
  const size_t slot = B * S ? buf.size_bytes() / (B * S) : 0;
  char* dst = static_cast<char*>(out->untyped_data());
  const char* src = static_cast<const char*>(rows.untyped_data());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t at = std::min<int64_t>(std::max<int64_t>(index.typed_data()[b], 0), S - T);
    std::memcpy(dst + (b * S + at) * slot, src + b * T * slot, T * slot);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelWriteRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Ids>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelTakeRows, TakeRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Ids>()
                                  .Ret<ffi::AnyBuffer>());
