"""Continuous batching on the device: a fixed set of decode slots over one preallocated KV cache.

Three kinds of compiled program share one donated state (`SlotState`):
  prefill(T)  one request's prompt (right-padded to a bucket of T tokens) into one slot: its rows
              of the cache are written, its first token sampled, its sampling settings stored.
              One program per prompt bucket.
  decode      up to CHUNK decode steps for every live slot at once (row b at most limit[b] of them),
              each row with its own temperature / top-k / top-p / seed / step
              (`sampling.RowSampling`, runtime values: no setting ever compiles a program). Rows
              that are done (EOS, their max_tokens, the context's end, or released by the host)
              stop producing tokens; free slots cost one cache slot of attention each (the decode
              attention reads only a row's own slots).
  verify(K)   speculative decoding (the drafts come from the host, scheduler.py): one forward call of
              each live row's last token and up to K drafted tokens; a row keeps the drafts the
              model agrees with plus one token of the model's own (greedy: the argmax; sampled:
              `sampling.speculative_accept`), 1 .. K + 1 tokens for one read of the weights. A row
              without drafts takes one plain step, the token the decode program would sample.
              Rejected drafts are rolled back by not advancing the row's cache index past them
              (slots past the index are never attended to and are written again). One program per
              K in VERIFY_K (and live-row bucket).

A request's tokens do not depend on the other slots: every op is row-wise, and a row's noise
depends only on its seed and its own step (`sampling.row_keys`), so a seeded request samples the
same text alone or in a busy batch, and a greedy one equals `jaxaccel.generate`. A verify call keys a
row's acceptance by its seed and step as well, and the host decides when a row drafts from that
row's own tokens only, so a seeded speculating request also samples the same text alone or busy.
The host side (which request sits in which slot, streaming, stop strings) is scheduler.py.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, program_cache
from .engine import MIN_PROMPT_BUCKET, decode_step, eos_array, prefill, prompt_bucket
from .kernels import KernelChoice
from .models import registry
from .sampling import TOP_LOGPROBS, RowSampling, argmax, logprobs, row_keys, sample, speculative_accept
from .sharding import init_cache

CHUNK = 8  # most decode steps per program call (the host streams and admits requests between calls)
# Fewer live requests than slots decode only their rows (gathered out of the cache and back each
# call): row counts up to the largest of these that is below the slot count, else all slots.
# Larger buckets would cost more in copying than the rows they leave out
# (`python -m bench.serve` measures the levels).
LIVE_BUCKETS = (1, 2, 4)
# Drafted tokens a verify call takes per row: the smallest of these that holds the call's longest
# draft (speculative.K_CHOICES' nonzero values: AdaptiveK picks k among them). Each row's cache
# has VERIFY_K[-1] slots past the context: a verify call writes K + 1 slots from a row's index
# (the KV cache writes clamp a start that does not fit, which would overwrite earlier slots).
VERIFY_K = (2, 4, 8)


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
        # ("decode", live-row bucket or all slots) / ("verify", rows, K) -> program
        self._programs: dict[tuple, object] = {}

    def _initial_state(self) -> SlotState:
        B = self.slots
        i32, f32 = (lambda v: jnp.full((B,), v, jnp.int32)), (lambda v: jnp.full((B,), v, jnp.float32))
        cache = init_cache(self.model.config, B, self.context + VERIFY_K[-1], self.model.cache_dtype)
        return SlotState(cache, i32(0), i32(0),
                         jnp.ones((B,), bool), i32(0), i32(1), RowSampling(f32(0.0), i32(0), f32(1.0)),
                         jnp.zeros((B,), bool))

    @property
    def compiled_programs(self) -> int:
        return len(self._prefills) + len(self._programs)

    def prompt_bucket(self, n: int) -> int:
        return min(prompt_bucket(n), self.context)

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
        first = sample(logits, row_keys(seed[None], 0), RowSampling(*(x[None] for x in rs)), self.module.kernels)
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

    def _decode_fn(self, params, state: SlotState, limit):
        """Up to CHUNK decode steps, row b at most limit[b] of them (a row past its limit keeps its
        place: its index and last token; rewriting that token's slot writes the same keys)."""
        B = state.token.shape[0]
        buf = lambda dtype, *tail: jnp.zeros((B, CHUNK) + tail, dtype)
        out = Tokens(buf(jnp.int32), buf(bool), buf(jnp.float32), buf(jnp.int32, TOP_LOGPROBS),
                     buf(jnp.float32, TOP_LOGPROBS))

        def body(carry):
            s, out, i = carry
            logits, cache = decode_step(self.module.apply, params, s.token, s.cache)
            live = ~s.done & (i < limit)
            tok = jnp.where(live, sample(logits, row_keys(s.seeds, s.produced), s.rs, self.module.kernels), s.token)
            lp, top_ids, top_lp = self._logprobs(s.want_lp & live, logits, tok)
            produced = s.produced + live
            # finished rows keep writing at slot 0 of their own (free) rows: never past the cache
            index = jnp.where(live, cache["index"], jnp.where(s.done, 0, s.cache["index"]))
            done = s.done | (live & (jnp.any(tok[:, None] == self.eos[None, :], axis=-1) | (produced >= s.max_new)
                                     | (index >= self.context)))
            s = s.replace(cache={**cache, "index": index}, token=tok, produced=produced, done=done)
            put = lambda a, v: a.at[:, i].set(v)
            out = Tokens(put(out.tokens, tok), put(out.valid, live), put(out.logprob, lp), put(out.top_ids, top_ids),
                         put(out.top_lp, top_lp))
            return s, out, i + 1

        cond = lambda carry: (carry[2] < CHUNK) & ~jnp.all(carry[0].done | (carry[2] >= limit))
        state, out, _ = jax.lax.while_loop(cond, body, (state, out, jnp.int32(0)))
        return state, out

    def _verify_fn(self, params, state: SlotState, drafts, n_drafts):
        """One forward call of each live row's last token and its drafts [B, K] (the first
        n_drafts[b] real; 0: the row takes a plain step) -> (state, Tokens [B, K + 1], accepted [B]:
        drafts the model agreed with). A row keeps its accepted drafts and the model's next token,
        cut after an EOS, at its max_tokens and at the context's end; its index advances past the
        tokens it kept (the rest of what this call wrote is rolled back)."""
        B, K = drafts.shape
        live = ~state.done
        index = jnp.where(live, state.cache["index"], 0)  # free rows write at slot 0 of their own rows
        n_drafts = jnp.where(live, n_drafts, 0)
        block = jnp.concatenate([state.token[:, None], drafts], axis=1)
        fwd = self.module.apply({"params": params}, block, cache={**state.cache, "index": index})
        logits, keys, greedy = fwd.logits, row_keys(state.seeds, state.produced), state.rs.temperature <= 0
        j = jnp.arange(K + 1)[None, :]
        pred = argmax(logits, self.module.kernels)  # greedy: the model's token after each position
        ok = (pred[:, :K] == drafts) & (j[:, :K] < n_drafts[:, None])
        greedy_accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        drawing = ~greedy & (n_drafts > 0)
        none = lambda: (jnp.zeros((B, K + 1), jnp.int32), jnp.zeros((B,), jnp.int32))
        drawn, drawn_accepted = jax.lax.cond(
            jnp.any(drawing), lambda: speculative_accept(logits, drafts, n_drafts, keys, state.rs), none)
        plain = sample(logits[:, 0], keys, state.rs, self.module.kernels)  # as a decode step samples: rows without drafts
        tokens = jnp.where((n_drafts == 0)[:, None], plain[:, None], jnp.where(greedy[:, None], pred, drawn))
        accepted = jnp.where(n_drafts == 0, 0, jnp.where(greedy, greedy_accepted, drawn_accepted))
        eos = jnp.any(tokens[..., None] == self.eos, axis=-1)
        no_eos_before = (jnp.cumsum(eos, axis=1) - eos) == 0
        valid = (live[:, None] & (j <= accepted[:, None]) & no_eos_before
                 & (state.produced[:, None] + j < state.max_new[:, None]) & (index[:, None] + j < self.context))
        n = jnp.sum(valid, axis=1)
        last = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        produced, index = state.produced + n, jnp.where(live, index + n, 0)
        done = state.done | jnp.any(valid & eos, axis=1) | (produced >= state.max_new) | (index >= self.context)
        state = state.replace(cache={**fwd.cache, "index": index}, token=jnp.where(live, last, state.token),
                              produced=produced, done=done)
        wide = lambda a: a.reshape((B * (K + 1),) + a.shape[2:])
        lp, top_ids, top_lp = self._logprobs(jnp.repeat(state.want_lp & live, K + 1), wide(logits), wide(tokens))
        back = lambda a: a.reshape((B, K + 1) + a.shape[1:])
        return state, Tokens(tokens, valid, back(lp), back(top_ids), back(top_lp)), accepted

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

    def _program(self, b: int, K: int | None = None):
        """The decode program (K None) or the verify program of K drafts, for b rows (all slots, or
        b of them gathered out of the state and back). Arguments: params, state, [rows [b],]
        release [slots] (rows the host ended), then per-slot arrays: decode limit [slots]; verify
        drafts [slots, K], n_drafts [slots]."""
        key = ("decode", b) if K is None else ("verify", b, K)
        if key in self._programs:
            return self._programs[key]
        fn = self._decode_fn if K is None else self._verify_fn
        per_slot = [jax.ShapeDtypeStruct((self.slots,), jnp.int32)] if K is None else \
            [jax.ShapeDtypeStruct((self.slots, K), jnp.int32), jax.ShapeDtypeStruct((self.slots,), jnp.int32)]
        mask = jax.ShapeDtypeStruct((self.slots,), bool)
        if b == self.slots:
            def run(params, state, release, *args):
                return fn(params, state.replace(done=state.done | release), *args)

            args = (self.model.params, self.state, mask, *per_slot)
        else:
            def run(params, state, rows, release, *args):
                # the released rows need not be among `rows`: marked done before the gather
                state = state.replace(done=state.done | release)
                take = lambda a: jnp.take(a, rows, axis=0)
                sub, *outs = fn(params, jax.tree.map(take, state), *map(take, args))
                return (jax.tree.map(lambda a, s: a.at[rows].set(s), state, sub), *outs)

            args = (self.model.params, self.state, jax.ShapeDtypeStruct((b,), jnp.int32), mask, *per_slot)
        name = f"decode rows={b} chunk={CHUNK}" if K is None else f"verify rows={b} K={K}"
        self._programs[key] = self._compile(run, args, name)
        return self._programs[key]

    def warm_up(self, prompt_buckets=(MIN_PROMPT_BUCKET,), verify: bool = False) -> None:
        """Compile the decode programs (and the verify programs when `verify`: otherwise they are
        compiled at the first speculating request) and the prefill of these prompt buckets now."""
        for b in {self.live_bucket(n) for n in range(1, self.slots + 1)}:
            self._program(b)
            for K in VERIFY_K if verify else ():
                self._program(b, K)
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

    def _run(self, release, live: list[int], K: int | None, *per_slot):
        """A decode (K None) or verify call for the `live` slots -> its outputs as numpy, rows of
        slots that did not run zeros (not valid)."""
        b, release = self.live_bucket(len(live)), np.asarray(release, bool)
        if b == self.slots:
            self.state, *outs = self._program(b, K)(self.model.params, self.state, release, *per_slot)
            return jax.tree.map(np.asarray, outs)
        rows = list(live) + [s for s in range(self.slots) if s not in live][: b - len(live)]
        self.state, *outs = self._program(b, K)(self.model.params, self.state, np.asarray(rows, np.int32), release,
                                                *per_slot)

        def spread(a):  # the b rows back at their slots
            full = np.zeros((self.slots,) + a.shape[1:], a.dtype)
            full[rows] = a
            return full

        return jax.tree.map(lambda a: spread(np.asarray(a)), outs)

    def decode(self, limit, release: np.ndarray, live: list[int]) -> Tokens:
        """Up to `limit` tokens (an int, or one per slot; at most CHUNK) for the `live` slots (others
        may be released); -> tokens [B, n] with `valid` [B, n] (rows of other slots are not valid)."""
        limit = np.minimum(np.broadcast_to(np.asarray(limit, np.int32), (self.slots,)), CHUNK).astype(np.int32)
        return self._run(release, live, None, limit)[0]

    def verify(self, drafts: dict[int, list[int]], release: np.ndarray, live: list[int]) -> tuple[Tokens, np.ndarray]:
        """One verify call for the `live` slots: `drafts` slot -> its drafted tokens (at most
        VERIFY_K[-1]; live slots without drafts take one plain step) -> (tokens [B, K + 1] with
        `valid`, accepted [B]: drafts the model agreed with)."""
        longest = max((len(d) for d in drafts.values()), default=1)
        K = next(k for k in VERIFY_K if k >= longest)
        block, n = np.zeros((self.slots, K), np.int32), np.zeros((self.slots,), np.int32)
        for slot, d in drafts.items():
            block[slot, : len(d)], n[slot] = d, len(d)
        out, accepted = self._run(release, live, K, block, n)
        return out, accepted

    def done(self) -> np.ndarray:
        return np.asarray(self.state.done)
