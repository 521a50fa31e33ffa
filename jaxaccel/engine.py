"""KV-cache generation: bucketing, prefill, decode loop, sampling, batching.

One compiled program per (sampler, batch bucket, prompt bucket, cache length): when asked it
runs `prefill` on the right-padded prompts, then `decode_step` inside a `lax.while_loop`
until a step limit, `max_new_tokens`, or every row has stopped (EOS). The loop state,
preallocated KV cache included, is donated in and handed back, so buffers are reused.

Without streaming or stop strings the host calls the program once. With them it calls it
once per chunk of tokens (same program, a different step limit): the host streams the new
text, checks stop strings and tells the next call which rows to stop. The first chunk is one
token (time to first token); later ones are sized by `StreamChunks` to last about
STREAM_INTERVAL_S, so a fast device (a GPU decodes a small model in ~1 ms a token, and a program
call costs a few ms) is not held back by one host round trip per token, while a slow one still
streams every token. No host callbacks are compiled in, so the program lands in XLA's
persistent compilation cache.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, programs
from .sharding import cache_shardings, init_cache

MIN_PROMPT_BUCKET = 16
NEW_TOKENS_QUANTUM = 64  # output buffer / cache tail is rounded up to this many tokens
EOS_SLOTS = 8  # EOS ids are passed padded (with -1) to this many, so the program's shapes are known early
STREAM_INTERVAL_S = 0.025  # streaming: each program call after the first decodes for about this long
MAX_STREAM_CHUNK = 64  # ... but at most this many tokens


class StreamChunks:
    """Tokens for each streaming program call. The first call prefills and decodes 1 token; the
    next two decode 1 and 2, so that a call's fixed cost and a token's cost can be told apart (a
    line through the last two calls of different sizes; a device slower than two intervals a
    token is not measured: it streams every token). Later calls take as many tokens as last
    STREAM_INTERVAL_S, or, where the fixed cost alone comes near that (a remote device), enough to
    make it at most a fifth of the call: 1..MAX_STREAM_CHUNK."""

    def __init__(self):
        self.calls = 0  # decode calls seen (after the first, prefill's)
        self.last: tuple[int, float] | None = None  # the last call's (tokens, seconds)
        self.per_call, self.per_token = 0.0, None

    def next(self, tokens: int, seconds: float) -> int:
        self.calls += 1
        if self.calls == 1:  # the prefill's call says nothing about a decode call
            return 1
        previous, self.last = self.last, (tokens, seconds)
        if previous is None:  # measure with 2 unless a token alone nearly fills two intervals
            return 2 if seconds < 2 * STREAM_INTERVAL_S else 1
        (k1, s1), (k2, s2) = previous, self.last
        if k1 != k2 and (s2 - s1) / (k2 - k1) > 0:
            self.per_token = (s2 - s1) / (k2 - k1)
            self.per_call = max(s2 - k2 * self.per_token, 0.0)
        elif self.per_token is None:  # noise: the larger call was not slower
            self.per_token, self.per_call = s2 / k2, 0.0
        t = max(self.per_token, 1e-9)
        k = max((STREAM_INTERVAL_S - self.per_call) / t, 4 * self.per_call / t)
        return int(min(MAX_STREAM_CHUNK, max(1, k + 1e-6)))  # 1e-6: 21.999... tokens is 22


def eos_array(eos: Sequence[int]) -> np.ndarray:
    """EOS ids padded with -1 (never a token) to EOS_SLOTS, or to a power of two beyond it."""
    ids = sorted(set(int(e) for e in eos))
    out = np.full((max(EOS_SLOTS, bucket(len(ids))),), -1, np.int32)
    out[: len(ids)] = ids
    return out


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(math.ceil(math.log2(max(n, 1))), math.ceil(math.log2(minimum)))


@flax.struct.dataclass
class LoopState:
    cache: dict
    token: jax.Array  # [B] last sampled token
    out: jax.Array  # [B, N] generated tokens (0 after a row stops)
    step: jax.Array  # () tokens generated so far
    done: jax.Array  # [B] row has stopped


@dataclass(frozen=True)
class Sampler:
    """Static part of sampling (changes the program); temperature/top_p values are dynamic."""

    greedy: bool = True
    top_k: int | None = None
    top_p: bool = False


def argmax(x):
    """jnp.argmax over the last axis (the first maximum; the first NaN if any) as plain
    reductions: XLA's CPU backend runs argmax's (value, index) reduction element by element, 1.2
    ms for Gemma 3's 262,144 logits against 0.1 ms this way (a tenth of a decode step). NaN is
    looked for on its own: XLA's CPU max drops NaN for long rows (6,000 values: -inf)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(jnp.isnan(x), axis=-1, keepdims=True), jnp.isnan(x), x == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


# top-p alone looks for its set among this many most likely tokens first, then among the next
# count (lax.top_k; on this 2-core CPU for 262,144 logits: 0.9 and 2.4 ms), and sorts all (15
# ms, _top_p_sorted) when neither holds it; 32,768 candidates would cost as much (13.8 ms)
TOP_P_CANDIDATES = (1024, 4096)


def sample(logits, keys, temperature, top_p, sampler: Sampler):
    """logits [B, V] float32, keys [B] PRNG keys -> tokens [B] int32.

    Order as in transformers: temperature, then top-k, then top-p (smallest set of tokens
    whose probability mass reaches top_p; the most likely token is always kept).
    Top-p alone sorts only the TOP_P_CANDIDATES[0] most likely tokens (lax.top_k) when they hold
    top_p of the mass, which decides the same set as sorting all V, else the next count's, and
    sorts all V only when neither holds it (flat distributions), as uint32 keys (15 ms for
    Gemma 3's 262,144 logits on this CPU; argsort took 70). Gemma 3 270M's sampled text at top_p
    0.95 needed more than 1,024 tokens at 1-2 steps in 128 and never more than 4,096; prompts of
    random ids or temperatures above 1 flatten it (sets of up to 57,000 tokens at temperature 1).
    """
    if sampler.greedy:
        return argmax(logits)
    logits = logits / temperature
    if sampler.top_k:
        return _draw(keys, *jax.lax.top_k(logits, sampler.top_k), top_p if sampler.top_p else None)
    if not sampler.top_p:
        return _draw(keys, logits, None, None)
    return _top_p(keys, logits, top_p, jax.nn.logsumexp(logits, axis=-1, keepdims=True),
                  tuple(n for n in TOP_P_CANDIDATES if n < logits.shape[-1]))


def _top_p(keys, logits, top_p, lse, counts):
    """Top-p alone among the counts[0] most likely tokens when every row's hold top_p of the
    mass (probabilities under the full softmax, `lse` its log-normaliser), else the next count,
    else all V sorted. Either way the noise is drawn by sorted position, and jax's threefry
    noise for n positions is the first n of V's (jax_threefry_partitionable), so a row draws
    the same token whichever way its batch went (tested)."""
    if not counts:
        return _top_p_sorted(keys, logits, top_p, lse)
    best, index = jax.lax.top_k(logits, counts[0])
    probs = jnp.exp(best - lse)
    enough = jnp.all(jnp.sum(probs, axis=-1) >= top_p)
    return jax.lax.cond(enough, lambda: _draw(keys, best, index, top_p, probs),
                        lambda: _top_p(keys, logits, top_p, lse, counts[1:]))


def _descending_key(x):
    """float32 -> uint32 whose ascending order is x's descending order (-0.0 taken as 0.0); its
    own inverse on the bits. XLA sorts 262,144 of these in 10 ms on this CPU, where sorting the
    floats takes 56 ms and argsort (values with indices) 69 ms."""
    b = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.uint32)
    return _flip(b)


def _flip(b):
    return jnp.where(b >> 31 == 1, b, ~b & jnp.uint32(0x7FFFFFFF))


def _top_p_sorted(keys, logits, top_p, lse):
    """Top-p over all V logits sorted: the same token as a stable argsort of -logits would give
    (the candidates' draw: noise by sorted position, probabilities exp(logit - lse)), with only
    the keys sorted; the drawn rank's vocabulary id is found after: the (rank - first rank of its
    value)-th logit equal to it, in vocabulary order. Rows with NaN / +inf logits give argmax's
    token, as the other draws do."""
    key = _descending_key(logits)
    ordered = jnp.sort(key, axis=-1)
    best = jax.lax.bitcast_convert_type(_flip(ordered), jnp.float32)
    rank = _draw(keys, best, None, top_p, jnp.exp(best - lse))
    value = jnp.take_along_axis(ordered, rank[:, None], axis=-1)
    equal = key == value
    nth = rank - jnp.sum(key < value, axis=-1)  # 0 unless the drawn value is tied
    iota = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
    lowest = lambda mask: jnp.min(jnp.where(mask, iota, key.shape[-1]), axis=-1)
    # the cumsum over V (1.7 ms here) only when some row drew a tied value past its first
    tied = lambda: lowest(equal & (jnp.cumsum(equal, axis=-1, dtype=jnp.int32) == nth[:, None] + 1))
    token = jax.lax.cond(jnp.any(nth > 0), tied, lambda: lowest(equal))
    return _argmax_where_no_softmax(logits, token, jnp.max(logits, axis=-1)).astype(jnp.int32)


def _draw(keys, logits, index, top_p, probs=None):
    """A token per row from logits [B, n] (sorted descending where top_p is given; `index` maps
    them to vocabulary ids, None: they are the vocabulary), keeping the top-p set; `probs` are
    their probabilities when the n are not the whole vocabulary."""
    if top_p is not None:
        if probs is None:
            probs = jax.nn.softmax(logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        logits = jnp.where(mass_before < top_p, logits, -jnp.inf)
    if top_p is None and logits.shape[-1] >= BLOCKED_DRAW_MIN:
        choice = _blocked_draw(keys, logits)
    else:  # jax.random.categorical's Gumbel-max draw (the same numbers, so the same tokens), with argmax
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
        choice = argmax(logits + gumbel)
    if index is not None:
        choice = jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


DRAW_BLOCK = 512  # _blocked_draw's block of logits
BLOCKED_DRAW_MIN = 8 * DRAW_BLOCK  # draws over at least this many logits go block first


def _blocked_draw(keys, logits):
    """A token per row from softmax(logits [B, n]) with 2 * DRAW_BLOCK noise values per row
    instead of n: a block of DRAW_BLOCK logits by its probability mass (Gumbel-max over the
    blocks' log-masses), then a token within that block (Gumbel-max over its logits). Exact:
    P(block) * P(token | block) is the token's softmax probability. Gemma 3's 262,144 Gumbel
    values cost 1.5 ms a step on this CPU (threefry; an int8 step takes about 11 ms), these 0.3 ms.
    NaN / +inf logits pick the first of them, as argmax does."""
    B, n = logits.shape
    nb = -(-n // DRAW_BLOCK)
    z = jnp.pad(logits, ((0, 0), (0, nb * DRAW_BLOCK - n)), constant_values=-jnp.inf).reshape(B, nb, DRAW_BLOCK)
    top = jnp.max(logits, axis=-1)
    mass = jnp.sum(jnp.exp(z - top[:, None, None]), axis=-1)  # [B, nb]

    def per_row(key, log_mass, blocks):
        k_block, k_token = jax.random.split(key)
        b = argmax(log_mass + jax.random.gumbel(k_block, log_mass.shape, log_mass.dtype))
        within = blocks[b]
        return b * DRAW_BLOCK + argmax(within + jax.random.gumbel(k_token, within.shape, within.dtype))

    drawn = jax.vmap(per_row)(keys, jnp.log(mass), z)
    return _argmax_where_no_softmax(logits, drawn, top)


def _argmax_where_no_softmax(logits, token, top):
    """`token`, except in rows with NaN or +inf logits (`top`: the rows' max), which have no
    softmax to draw from: argmax's token there, as a greedy step gives. The full argmax runs only
    when some row needs it, not at every step."""
    odd = jnp.any(jnp.isnan(logits), axis=-1) | (top == jnp.inf)
    return jax.lax.cond(jnp.any(odd), lambda: jnp.where(odd, argmax(logits), token), lambda: token)


def _keys(seeds, step):
    """Per-row keys: a row's randomness depends only on its own seed and the step."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(seeds)


def prefill(apply, params, tokens, lengths, cache):
    """Right-padded prompts [B, T] -> (last-token logits [B, V], cache with index = lengths).

    Writes slots 0..T-1 of every row; whatever a reused cache held there is overwritten, and
    slots past a row's length are never attended to before they are rewritten.
    """
    cache = {**cache, "index": jnp.zeros_like(lengths)}
    logits, cache = apply({"params": params}, tokens, cache=cache, logit_index=(lengths - 1)[:, None])
    return logits[:, 0], {**cache, "index": lengths}


def decode_step(apply, params, token, cache):
    """One token per row [B] -> (logits [B, V], cache advanced by one)."""
    logits, cache = apply({"params": params}, token[:, None], cache=cache)
    return logits[:, 0], cache


class Engine:
    """Compiled generation programs and preallocated caches for one model.

    One program per (sampler, batch bucket, prompt bucket, cache length). A call runs the
    prefill (when `prefill_now`) and then decode steps until `stop_at`, `max_new` or every row
    is done; the host calls it once (no streaming) or once per chunk of tokens (streaming,
    stop strings). The loop state, KV cache included, is donated on every call.
    """

    def __init__(self, model):
        self.model = model
        self._caches: dict[tuple[int, int], dict] = {}
        self._compiled: dict[tuple, Future] = {}  # (sampler, B, T, S, EOS slots) -> Future of the program
        self._lock = threading.Lock()

    @property
    def compiled_programs(self) -> int:
        """How many XLA programs the generation functions have compiled so far."""
        return sum(f.done() and f.exception() is None for f in self._compiled.values())

    @staticmethod
    def shapes(n_prompts: int, longest_prompt: int, max_new_tokens: int) -> tuple[int, int, int, int]:
        """(batch bucket B, prompt bucket T, new-token capacity, cache length S) of a request."""
        B, T = bucket(n_prompts), bucket(longest_prompt, MIN_PROMPT_BUCKET)
        new_cap = NEW_TOKENS_QUANTUM * math.ceil(max_new_tokens / NEW_TOKENS_QUANTUM)
        return B, T, new_cap, T + new_cap

    def _program(self, sampler: Sampler, B: int, T: int, new_cap: int, n_eos: int = EOS_SLOTS,
                 background: bool = False) -> Future:
        """Future of the compiled program for these shapes: traced and lowered here, compiled (or
        fetched from XLA's persistent cache) here or, with `background`, in a thread (XLA runs
        without the GIL). Each shape is built once; later askers get the same future."""
        key, S = (sampler, B, T, T + new_cap, n_eos), T + new_cap
        with self._lock:
            fut = self._compiled.get(key)
            if fut is not None:
                return fut
            fut = self._compiled[key] = Future()
        try:
            state = self._fresh_state(B, S, new_cap)
            i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
            f32 = jax.ShapeDtypeStruct((), jnp.float32)
            args = (self.model.params, state, i32(B, T), i32(B), jax.ShapeDtypeStruct((B,), bool), i32(B), i32(),
                    f32, f32, i32(n_eos), jax.ShapeDtypeStruct((), bool), i32(), jax.ShapeDtypeStruct((B,), bool))
            m = self.model
            fast = kernels.usable(m)
            # int8_vnni: such builds also take the int8 prefill's rows (a portable build refuses them)
            name = (f"generate {m.config!r} {m.dtype} {m.quant!r} {sampler!r} {key[1:]} cpu_kernels={fast} "
                    f"int8_vnni={fast and kernels.int8_vnni()}")
            with kernels.decoding(fast):  # decode-step dots read weights through the CPU kernel
                finish = programs.lower_cached(partial(self._step, sampler), args, (1,), state, name)
            self._caches[(B, S)] = state.cache
        except BaseException as e:
            self._failed(key, fut, e)
            raise

        def compile_():
            try:
                fut.set_result(finish())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                self._failed(key, fut, e)

        if background:  # not a daemon: exiting mid-compile would abort the process, so exit waits
            threading.Thread(target=compile_, name="jaxaccel-compile").start()
        else:
            compile_()
        return fut

    def _failed(self, key, fut: Future, e: BaseException) -> None:
        with self._lock:
            self._compiled.pop(key, None)
        fut.set_exception(e)

    def prepare(self, n_prompts: int, longest_prompt: int, max_new_tokens: int, sampler: Sampler = Sampler()) -> None:
        """Trace the program a request of this shape will run and start compiling it in a thread;
        returns once tracing is done (the CLI then parses the tokenizer while XLA compiles)."""
        B, T, new_cap, _ = self.shapes(n_prompts, longest_prompt, max_new_tokens)
        self._program(sampler, B, T, new_cap, background=True)

    def _step(self, sampler, params, state: LoopState, tokens, lengths, active, seeds, max_new,
              temperature, top_p, eos, prefill_now, stop_at, host_done):
        apply = self.model.module.apply

        def stopped(tok, step, done_before):
            hit_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
            return done_before | hit_eos | (step + 1 >= max_new)

        def start(s: LoopState):
            logits, cache = prefill(apply, params, tokens, lengths, s.cache)
            first = jnp.where(active, sample(logits, _keys(seeds, 0), temperature, top_p, sampler), 0)
            return LoopState(cache, first, s.out.at[:, 0].set(first), jnp.int32(1),
                             stopped(first, 0, ~active))

        def body(s: LoopState):
            logits, cache = decode_step(apply, params, s.token, s.cache)
            tok = sample(logits, _keys(seeds, s.step), temperature, top_p, sampler)
            tok = jnp.where(s.done, 0, tok)
            return LoopState(cache, tok, s.out.at[:, s.step].set(tok), s.step + 1,
                             stopped(tok, s.step, s.done))

        def cond(s: LoopState):
            return (s.step < stop_at) & (s.step < max_new) & ~jnp.all(s.done)

        state = state.replace(done=state.done | host_done)
        state = jax.lax.cond(prefill_now, start, lambda s: s, state)
        state = jax.lax.while_loop(cond, body, state)
        mesh = getattr(self.model, "mesh", None)
        if mesh is not None:  # the cache goes out sharded as it came in: the next call takes it back
            state = state.replace(cache=jax.lax.with_sharding_constraint(
                state.cache, cache_shardings(state.cache, mesh)))
        return state

    def _fresh_state(self, B: int, S: int, new_cap: int) -> LoopState:
        cache = self._caches.pop((B, S), None)
        if cache is None:
            cache = init_cache(self.model.config, B, S, self.model.cache_dtype, getattr(self.model, "mesh", None))
        zeros = jnp.zeros((B,), jnp.int32)
        return LoopState(cache, zeros, jnp.zeros((B, new_cap), jnp.int32), jnp.int32(0),
                         jnp.zeros((B,), bool))

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampler: Sampler,
            temperature: float, top_p: float | None, seeds: Sequence[int], eos: Sequence[int],
            host_step: Callable | None = None, chunk: int | None = None) -> list[np.ndarray]:
        """Generate for validated token-id prompts; returns each row's tokens (0s after an EOS).

        host_step(tokens [B, k], first_step) -> bool [B] is called after every chunk of k new
        tokens (streaming, stop strings); rows it flags stop there (their tokens end with that
        chunk). `chunk`: k for every call; None: sized by `StreamChunks` (on several processes 1:
        every process must ask its program for the same steps, and timings differ between them).
        """
        if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1):
            raise ValueError(f"chunk must be an integer >= 1 (or None: sized by timing), got {chunk!r}")
        if chunk is None and jax.process_count() > 1:
            chunk = 1
        n = len(prompts)
        B, T, new_cap, S = self.shapes(n, max(len(p) for p in prompts), max_new_tokens)
        tokens = np.zeros((B, T), np.int32)
        lengths = np.ones((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        seed_arr = np.zeros((B,), np.int32)
        seed_arr[:n] = seeds
        fixed = (tokens, lengths, np.arange(B) < n, seed_arr, np.int32(max_new_tokens),
                 np.float32(temperature if temperature > 0 else 1.0),
                 np.float32(top_p if top_p is not None else 1.0), eos_array(eos))
        program = self._program(sampler, B, T, new_cap, n_eos=fixed[-1].size).result()
        state, done_at, host_done = self._fresh_state(B, S, new_cap), 0, np.zeros((B,), bool)
        stop_len = np.full((B,), max_new_tokens)  # where the host stopped a row
        k, sizes = chunk or 1, StreamChunks()
        while True:
            stop_at = max_new_tokens if host_step is None else done_at + k
            t0 = time.perf_counter()
            state = program(self.model.params, state, *fixed, np.bool_(done_at == 0),
                            np.int32(stop_at), host_done)
            step = int(state.step)
            k = chunk or sizes.next(step - done_at, time.perf_counter() - t0)
            if host_step is not None:
                flagged = np.asarray(host_step(_host(state.out)[:, done_at:step], done_at), bool)
                stop_len = np.where(flagged & ~host_done, step, stop_len)
                host_done = host_done | flagged
            done_at = step
            if step >= max_new_tokens or bool(np.all(_host(state.done) | host_done)):
                break
        out = _host(state.out)[:n, :done_at]
        self._caches[(B, S)] = state.cache
        return [row[: stop_len[i]] for i, row in enumerate(out)]


def _host(x) -> np.ndarray:
    """A result array on the host; on several hosts (batch sharded across processes) every
    process gathers the whole array."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from .distributed import gather

        return np.asarray(gather(x))
    return np.asarray(x)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = float("nan")
    total_time: float = float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding."""
        return max(self.generated_tokens - 1, 0) / max(self.total_time - self.time_to_first_token, 1e-9)


# --- public API ---------------------------------------------------------------------------
def _engine(model) -> Engine:
    eng = model.__dict__.get("_engine")
    if eng is None:
        eng = model.__dict__["_engine"] = Engine(model)
    return eng


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _eos_ids(model) -> list[int]:
    eos = model.config.eos_token_id
    ids = list(eos) if isinstance(eos, tuple) else ([] if eos is None else [eos])
    tok = model.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.append(int(tok.eos_token_id))
    return sorted(set(ids))


def encode_prompts(model, prompts) -> list[list[int]]:
    """Strings (tokenized with the model's tokenizer, BOS added as it specifies) or id lists."""
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not a single prompt")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            ids = list(model.tokenizer(p)["input_ids"])
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        model.check_tokens(np.asarray(ids, np.int64))
        out.append(ids)
    return out


def make_sampler(model, temperature: float, top_k: int | None, top_p: float | None) -> Sampler:
    greedy = temperature == 0.0
    top_k = None if greedy or top_k is None else min(int(top_k), model.config.vocab_size)
    return Sampler(greedy=greedy, top_k=top_k, top_p=(not greedy and top_p is not None and top_p < 1.0))


def prepare(model, n_prompts: int, prompt_tokens: int, max_new_tokens: int = 32, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None) -> None:
    """Trace the program that `generate` with these settings will run (its bucket of
    `prompt_tokens`) and compile it in a thread; returns after tracing. Optional: generate
    compiles on demand, and waits for a compile already in progress."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    _engine(model).prepare(n_prompts, prompt_tokens, max_new_tokens, make_sampler(model, temperature, top_k, top_p))


def generate_tokens(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed=0,
                    host_step: Callable | None = None) -> list[list[int]]:
    """Token-level generation: prompts (strings or id lists) -> generated ids per prompt.

    The ids stop after the first EOS (which is included) or at `max_new_tokens`.
    `seed` is an int for all rows or one int per prompt; a row's samples depend only on its
    own seed, so the same seed gives the same tokens whatever else is in the batch.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = encode_prompts(model, prompts)
    limit = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions but the model has {limit}; shorten the prompt "
                "or lower max_new_tokens")
    seeds = [int(seed)] * len(ids) if np.isscalar(seed) else [int(s) for s in seed]
    if len(seeds) != len(ids):
        raise ValueError(f"got {len(seeds)} seeds for {len(ids)} prompts")
    sampler = make_sampler(model, temperature, top_k, top_p)
    eos = _eos_ids(model)
    out = _engine(model).run(ids, max_new_tokens, sampler, temperature, top_p, seeds, eos, host_step)
    result = []
    for row in out:
        row = row.tolist()
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        result.append(row if stop is None else row[: stop + 1])
    return result


class _TextStreamer:
    """Host side of the decode loop: incremental detokenisation, stop strings, timing. Text that
    could be the start of a stop string is held back until the next tokens tell; `flush` sends
    what is held when generation ends."""

    def __init__(self, model, n, stop, stream, eos):
        self.tok, self.n, self.stop, self.stream, self.eos = model.tokenizer, n, stop, stream, set(eos)
        self.ids = [[] for _ in range(n)]
        self.sent = [""] * n  # streamed so far
        self.texts = [""] * n  # the text so far (cut at a stop string)
        self.finished = [False] * n
        self.first_token_at = None

    def text(self, i) -> str:
        return self.tok.decode(self.ids[i], skip_special_tokens=True)

    def _stop_at(self, text: str) -> int:
        """Where the first stop string starts in `text`, -1 if none does."""
        return min((text.find(s) for s in self.stop if s in text), default=-1)

    def __call__(self, tokens, first_step):
        """tokens [B, k]: the k newest tokens of every row -> bool [B] rows that hit a stop string."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        hit = np.zeros(tokens.shape[0], bool)
        for i in range(self.n):
            if self.finished[i]:
                continue
            new = []
            for t in tokens[i].tolist():
                if t in self.eos:
                    self.finished[i] = True
                    break
                new.append(t)
            self.ids[i] += new
            text = self.text(i)
            cut = self._stop_at(text)
            if cut >= 0:
                # a chunk can run past the stop string: keep the tokens up to the one completing it
                while len(new) > 1 and self._stop_at(self.tok.decode(self.ids[i][:-1], skip_special_tokens=True)) >= 0:
                    self.ids[i].pop()
                    new.pop()
                text, hit[i], self.finished[i] = text[:cut], True, True
            elif text.endswith("\ufffd") and not self.finished[i]:
                continue  # an incomplete multi-byte character: wait for the next token
            self.texts[i] = text
            held = 0 if self.finished[i] else max(
                (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            self._send(i, text[: len(text) - held])
        return hit

    def _send(self, i, text):
        if self.stream is not None and len(text) > len(self.sent[i]):
            self.stream(i, text[len(self.sent[i]):])
        self.sent[i] = text

    def flush(self) -> list[str]:
        """Send what was held back for a stop string that never came; -> every row's text."""
        for i in range(self.n):
            self._send(i, self.texts[i])
        return list(self.sent)


def generate(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed=0,
             stop: Sequence[str] | str | None = None,
             stream: Callable[[int, str], Any] | None = None,
             stats: GenerationStats | None = None) -> list[str]:
    """Generate continuations (prompt excluded) of each prompt.

    prompts: list of strings or token-id lists. temperature 0 = greedy. stop: strings that end
    a row (excluded from the text). stream(i, text) receives new text of prompt i as it is
    produced. Pass a `GenerationStats` to get time to first token and throughput.
    """
    if model.tokenizer is None:
        raise ValueError("generate() returns text and needs a tokenizer; this model has none. "
                         "Use jaxaccel.generate_tokens() for token ids.")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = encode_prompts(model, prompts)
    streamer = _TextStreamer(model, len(ids), stop, stream, _eos_ids(model))
    start = time.perf_counter()
    generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, seed, host_step=streamer)
    texts = streamer.flush()
    end = time.perf_counter()
    if stats is not None:
        stats.prompt_tokens = sum(len(p) for p in ids)
        stats.generated_tokens = sum(len(r) for r in streamer.ids)
        stats.time_to_first_token = (streamer.first_token_at or end) - start
        stats.total_time = end - start
    return texts
