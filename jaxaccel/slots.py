"""Continuous batching on the device: a fixed set of decode slots over one preallocated KV cache.

Two kinds of compiled program share one donated state (`SlotState`):
  prefill(T)  one request's prompt (right-padded to a bucket of T tokens) into one slot: its rows
              of the cache are written, its first token sampled, its sampling settings stored.
              One program per prompt bucket.
  decode      up to CHUNK decode steps for every live slot at once, each row with its own temperature /
              top-k / top-p / seed / step (`sampling.RowSampling`, runtime values: no setting ever
              compiles a program). Rows that are done (EOS, their max_tokens, the context's end,
              or released by the host) stop producing tokens; free slots cost one cache slot of
              attention each (the decode attention reads only a row's own slots).

A request's tokens do not depend on the other slots: every op is row-wise, and a row's noise
depends only on its seed and its own step (`sampling.row_keys`), so a seeded request samples the
same text alone or in a busy batch, and a greedy one equals `jaxaccel.generate`.
The host side (which request sits in which slot, streaming, stop strings) is scheduler.py.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, program_cache
from .engine import MIN_PROMPT_BUCKET, bucket, decode_step, eos_array, prefill
from .kernels import KernelChoice
from .models import registry
from .sampling import TOP_LOGPROBS, RowSampling, logprobs, row_keys, sample
from .sharding import init_cache

CHUNK = 8  # most decode steps per program call (the host streams and admits requests between calls)
# Fewer live requests than slots decode only their rows (gathered out of the cache and back each
# call): row counts up to the largest of these that is below the slot count, else all slots.
# Larger buckets would cost more in copying than the rows they leave out
# (`python -m bench.serve` measures the levels).
LIVE_BUCKETS = (1, 2, 4)


@flax.struct.dataclass
class SlotState:
    cache: dict  # the KV cache of every slot [B, S]; cache["index"] [B]: tokens cached per row
    token: jax.Array  # [B] the last token of each row
    produced: jax.Array  # [B] tokens generated so far (the row's sampling step)
    done: jax.Array  # [B] the row produces nothing more
    seeds: jax.Array  # [B]
    max_new: jax.Array  # [B]
    rs: RowSampling  # [B] each row's sampling settings
    want_lp: jax.Array  # [B] the row's request asked for logprobs


@flax.struct.dataclass
class Tokens:
    """What a program call produced: tokens [B, n] where `valid`, and their logprobs (the model's
    log-softmax; zeros unless the row asked): chosen [B, n], top ids / values [B, n, TOP_LOGPROBS]."""

    tokens: jax.Array
    valid: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_lp: jax.Array


class SlotEngine:
    """The slots' device state and programs for one model: `slots` rows, `context` cache slots each."""

    def __init__(self, model, slots: int, context: int, eos):
        if getattr(model, "mesh", None) is not None:
            raise ValueError("serving a model sharded over a device mesh is not supported yet; load it without mesh=")
        self.model, self.slots, self.context = model, slots, context
        self.module = registry.build(model.config, model.dtype, dot_general_cls=model.dot_general_cls,
                                     kernels=KernelChoice(decode=kernels.usable(model)))
        self.eos = eos_array(eos)
        self.state = self._initial_state()
        self._prefills: dict[int, object] = {}
        self._decodes: dict[int, object] = {}  # live-row bucket (or all slots) -> program

    def _initial_state(self) -> SlotState:
        B = self.slots
        i32, f32 = (lambda v: jnp.full((B,), v, jnp.int32)), (lambda v: jnp.full((B,), v, jnp.float32))
        return SlotState(init_cache(self.model.config, B, self.context, self.model.cache_dtype), i32(0), i32(0),
                         jnp.ones((B,), bool), i32(0), i32(1), RowSampling(f32(0.0), i32(0), f32(1.0)),
                         jnp.zeros((B,), bool))

    @property
    def compiled_programs(self) -> int:
        return len(self._prefills) + len(self._decodes)

    def prompt_bucket(self, n: int) -> int:
        return min(bucket(n, MIN_PROMPT_BUCKET), self.context)

    # -- programs -------------------------------------------------------------------------------

    def _logprobs(self, want, logits, tokens):
        """logprobs() for the rows that asked, computed only when some row did."""
        B = logits.shape[0]
        zeros = lambda: (jnp.zeros((B,), jnp.float32), jnp.zeros((B, TOP_LOGPROBS), jnp.int32),
                         jnp.zeros((B, TOP_LOGPROBS), jnp.float32))
        return jax.lax.cond(jnp.any(want), lambda: logprobs(logits, tokens), zeros)

    def _prefill_fn(self, params, state: SlotState, tokens, length, slot, seed, max_new, rs: RowSampling, want_lp):
        """tokens [1, T] (length real ones) into slot `slot`: rows 0..T-1 of its cache written."""
        T = tokens.shape[1]
        layers = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=0)[:, :T], state.cache["layers"])
        logits, row = prefill(self.module.apply, params, tokens, length[None], {"index": length[None], "layers": layers})
        first = sample(logits, row_keys(seed[None], 0), RowSampling(*(x[None] for x in rs)))
        lp, top_ids, top_lp = self._logprobs(want_lp[None], logits, first)
        zero = jnp.zeros((), jnp.int32)
        cache = {"index": state.cache["index"].at[slot].set(length),
                 "layers": jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice(c, r, (slot,) + (zero,) * (c.ndim - 1)),
                                        state.cache["layers"], row["layers"])}
        done = jnp.any(first[0] == self.eos) | (max_new <= 1) | (length >= self.context)
        at = lambda a, v: a.at[slot].set(v)
        state = SlotState(cache, at(state.token, first[0]), at(state.produced, 1), at(state.done, done),
                          at(state.seeds, seed), at(state.max_new, max_new),
                          RowSampling(*(at(a, v) for a, v in zip(state.rs, rs))), at(state.want_lp, want_lp))
        out = Tokens(first[None], jnp.ones((1, 1), bool), lp[None], top_ids[None], top_lp[None])
        return state, out

    def _decode_rows_fn(self, params, state: SlotState, rows, steps, release):
        """`_decode_fn` for the slots `rows` [b] only (distinct): their rows of the state are
        gathered, decoded and written back; the others are untouched."""
        state = state.replace(done=state.done | release)
        sub = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), state)
        sub, out = self._decode_fn(params, sub, steps, jnp.zeros(rows.shape, bool))
        return jax.tree.map(lambda a, b: a.at[rows].set(b), state, sub), out

    def _decode_fn(self, params, state: SlotState, steps, release):
        """Up to `steps` (<= CHUNK) decode steps for every row; `release` [B]: rows the host ended."""
        B = state.token.shape[0]
        state = state.replace(done=state.done | release)
        buf = lambda dtype, *tail: jnp.zeros((B, CHUNK) + tail, dtype)
        out = Tokens(buf(jnp.int32), buf(bool), buf(jnp.float32), buf(jnp.int32, TOP_LOGPROBS),
                     buf(jnp.float32, TOP_LOGPROBS))

        def body(carry):
            s, out, i = carry
            logits, cache = decode_step(self.module.apply, params, s.token, s.cache)
            live = ~s.done
            tok = jnp.where(live, sample(logits, row_keys(s.seeds, s.produced), s.rs), 0)
            lp, top_ids, top_lp = self._logprobs(s.want_lp & live, logits, tok)
            produced = s.produced + live
            # finished rows keep writing at slot 0 of their own (free) rows: never past the cache
            index = jnp.where(live, cache["index"], 0)
            done = s.done | jnp.any(tok[:, None] == self.eos[None, :], axis=-1) | (produced >= s.max_new) \
                | (index >= self.context)
            s = s.replace(cache={**cache, "index": index}, token=tok, produced=produced, done=done)
            put = lambda a, v: a.at[:, i].set(v)
            out = Tokens(put(out.tokens, tok), put(out.valid, live), put(out.logprob, lp), put(out.top_ids, top_ids),
                         put(out.top_lp, top_lp))
            return s, out, i + 1

        cond = lambda carry: (carry[2] < steps) & ~jnp.all(carry[0].done)
        state, out, _ = jax.lax.while_loop(cond, body, (state, out, jnp.int32(0)))
        return state, out

    def _compile(self, fn, args, name):
        out_like = jax.eval_shape(fn, *args)
        m = self.model
        key = (f"slots {name} {m.config!r} {m.dtype} {m.quant!r} B={self.slots} S={self.context} "
               f"eos={self.eos.tolist()} {self.module.kernels!r} int8_path={kernels.int8_path()}")
        return program_cache.lower_cached(fn, args, (1,), out_like, key)()

    def _prefill_program(self, T: int):
        if T not in self._prefills:
            i32 = jax.ShapeDtypeStruct((), jnp.int32)
            f32 = jax.ShapeDtypeStruct((), jnp.float32)
            args = (self.model.params, self.state, jax.ShapeDtypeStruct((1, T), jnp.int32), i32, i32, i32, i32,
                    RowSampling(f32, i32, f32), jax.ShapeDtypeStruct((), bool))
            self._prefills[T] = self._compile(self._prefill_fn, args, f"prefill T={T}")
        return self._prefills[T]

    def live_bucket(self, live: int) -> int:
        """Rows a decode call runs for `live` live slots: a LIVE_BUCKETS size below the slot count, or all."""
        return next((b for b in LIVE_BUCKETS if live <= b < self.slots), self.slots)

    def _decode_program(self, b: int):
        if b not in self._decodes:
            i32, mask = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((self.slots,), bool)
            if b == self.slots:
                args, fn = (self.model.params, self.state, i32, mask), self._decode_fn
            else:
                args = (self.model.params, self.state, jax.ShapeDtypeStruct((b,), jnp.int32), i32, mask)
                fn = self._decode_rows_fn
            self._decodes[b] = self._compile(fn, args, f"decode rows={b} chunk={CHUNK}")
        return self._decodes[b]

    def warm_up(self, prompt_buckets=(MIN_PROMPT_BUCKET,)) -> None:
        """Compile the decode programs and the prefill of these prompt buckets now."""
        for b in {self.live_bucket(n) for n in range(1, self.slots + 1)}:
            self._decode_program(b)
        for T in prompt_buckets:
            if T <= self.context:
                self._prefill_program(T)

    # -- calls ------------------------------------------------------------------------------------

    def prefill(self, slot: int, ids, seed: int, max_new: int, rs: RowSampling, want_lp: bool) -> Tokens:
        """Start a request in `slot` (its prompt `ids` fits the context; `rs`: its one row of
        settings); -> its first token."""
        T = self.prompt_bucket(len(ids))
        tokens = np.zeros((1, T), np.int32)
        tokens[0, : len(ids)] = ids
        program = self._prefill_program(T)
        self.state, out = program(self.model.params, self.state, tokens, np.int32(len(ids)), np.int32(slot),
                                  np.int32(seed), np.int32(max_new), RowSampling(*(np.asarray(a)[0] for a in rs)),
                                  np.bool_(want_lp))
        return jax.tree.map(np.asarray, out)

    def decode(self, steps: int, release: np.ndarray, live: list[int]) -> Tokens:
        """Up to `steps` tokens for the `live` slots (others may be released); -> tokens [B, n]
        with `valid` [B, n] (rows of other slots are not valid)."""
        b, steps, release = self.live_bucket(len(live)), np.int32(min(steps, CHUNK)), np.asarray(release, bool)
        if b == self.slots:
            self.state, out = self._decode_program(b)(self.model.params, self.state, steps, release)
            return jax.tree.map(np.asarray, out)
        rows = list(live) + [s for s in range(self.slots) if s not in live][: b - len(live)]
        self.state, out = self._decode_program(b)(self.model.params, self.state, np.asarray(rows, np.int32), steps,
                                                  release)

        def spread(a):  # the b rows back at their slots
            full = np.zeros((self.slots,) + a.shape[1:], a.dtype)
            full[rows] = a
            return full

        return jax.tree.map(lambda a: spread(np.asarray(a)), out)

    def done(self) -> np.ndarray:
        return np.asarray(self.state.done)
