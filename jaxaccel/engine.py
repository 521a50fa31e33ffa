"""KV-cache generation programs: bucketing, prefill, the decode loop, batching.

One compiled program per (batch bucket, prompt bucket, cache length); sampling settings are
runtime values per row (`sampling.RowSampling`), so they never compile another: when asked it
runs `prefill` on the right-padded prompts, then `decode_step` inside a `lax.while_loop`
until a step limit, `max_new_tokens`, or every row has stopped (EOS). The loop state,
preallocated KV cache included, is donated in and handed back, so buffers are reused.

Without streaming or stop strings the host calls the program once. With them it calls it
once per chunk of tokens (same program, a different step limit): the host streams the new
text, checks stop strings and tells the next call which rows to stop (chunk sizes:
`streaming.StreamChunks`). No host callbacks are compiled in, so the program lands in XLA's
persistent compilation cache.

The engine traces its own module of the model: on the CPU backend for unsharded models it is
built with `KernelChoice(decode=True)` (see kernels/), so decode steps read weights through the
CPU matvec kernel; `Model.logits` and training use the model's plain module.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, program_cache
from .distributed import gather
from .kernels import KernelChoice
from .models import registry
from .sampling import RowSampling, pad_rows, row_keys, sample
from .sharding import cache_shardings, init_cache
from .streaming import StreamChunks

MIN_PROMPT_BUCKET = 16
NEW_TOKENS_QUANTUM = 64  # output buffer / cache tail is rounded up to this many tokens
EOS_SLOTS = 8  # EOS ids are passed padded (with -1) to this many, so the program's shapes are known early


def eos_array(eos: Sequence[int]) -> np.ndarray:
    """EOS ids padded with -1 (never a token) to EOS_SLOTS, or to a power of two beyond it."""
    ids = sorted(set(int(e) for e in eos))
    out = np.full((max(EOS_SLOTS, bucket(len(ids))),), -1, np.int32)
    out[: len(ids)] = ids
    return out


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(math.ceil(math.log2(max(n, 1))), math.ceil(math.log2(minimum)))


def prompt_bucket(n: int) -> int:
    """The prompt length a program is compiled for: the smallest of 16, 24, 32, 48, 64, 96, ...
    (powers of two and 1.5x them) >= n. The prefill's cost grows with it, so half-octave steps
    pad a prompt by at most 1.5x where powers of two pad by up to 2x (a 33-token prompt: 48 rows,
    not 64), for at most twice as many prefill programs."""
    b = bucket(n, MIN_PROMPT_BUCKET)
    return b * 3 // 4 if b > MIN_PROMPT_BUCKET and n <= b * 3 // 4 else b


@flax.struct.dataclass
class LoopState:
    cache: dict
    token: jax.Array  # [B] last sampled token
    out: jax.Array  # [B, N] generated tokens (0 after a row stops)
    step: jax.Array  # () tokens generated so far
    done: jax.Array  # [B] row has stopped


def prefill(apply, params, tokens, lengths, cache):
    """Right-padded prompts [B, T] -> (last-token logits [B, V], cache with index = lengths).

    Writes slots 0..T-1 of every row; whatever a reused cache held there is overwritten, and
    slots past a row's length are never attended to before they are rewritten.
    """
    cache = {**cache, "index": jnp.zeros_like(lengths)}
    out = apply({"params": params}, tokens, cache=cache, logit_index=(lengths - 1)[:, None])
    return out.logits[:, 0], {**out.cache, "index": lengths}


def decode_step(apply, params, token, cache):
    """One token per row [B] -> (logits [B, V], cache advanced by one)."""
    out = apply({"params": params}, token[:, None], cache=cache)
    return out.logits[:, 0], out.cache


class Engine:
    """Compiled generation programs and preallocated caches for one model.

    One program per (batch bucket, prompt bucket, cache length). A call runs the
    prefill (when `prefill_now`) and then decode steps until `stop_at`, `max_new` or every row
    is done; the host calls it once (no streaming) or once per chunk of tokens (streaming,
    stop strings). The loop state, KV cache included, is donated on every call.
    """

    def __init__(self, model):
        self.model = model
        # decode steps on the CPU backend (one device) read weights through the CPU kernels, unless
        # the model names its own choice (Model.kernels: KernelChoice() is XLA's ops)
        choice = getattr(model, "kernels", None)
        self.kernels = choice if choice is not None else KernelChoice(decode=kernels.usable(model))
        self.module = registry.build(model.config, model.dtype, dot_general_cls=model.dot_general_cls,
                                     kernels=self.kernels)
        self._caches: dict[tuple[int, int], dict] = {}
        self._compiled: dict[tuple, Future] = {}  # (B, T, S, EOS slots) -> Future of the program
        self._lock = threading.Lock()

    @property
    def compiled_programs(self) -> int:
        """How many XLA programs the generation functions have compiled so far."""
        return sum(f.done() and f.exception() is None for f in self._compiled.values())

    @classmethod
    def cache_bytes(cls, model, n_prompts: int, longest_prompt: int, max_new_tokens: int) -> int:
        """Bytes of the KV cache (and output buffer) a request of this shape allocates."""
        B, _, new_cap, S = cls.shapes(n_prompts, longest_prompt, max_new_tokens)
        cfg = model.config
        per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(model.cache_dtype).itemsize
        if jnp.dtype(model.cache_dtype) == jnp.int8:
            per_slot += 2 * cfg.num_layers * cfg.num_kv_heads * 4  # a float32 scale per (token, kv head)
        return B * S * per_slot + B * new_cap * 4

    @staticmethod
    def shapes(n_prompts: int, longest_prompt: int, max_new_tokens: int) -> tuple[int, int, int, int]:
        """(batch bucket B, prompt bucket T, new-token capacity, cache length S) of a request."""
        B, T = bucket(n_prompts), prompt_bucket(longest_prompt)
        new_cap = NEW_TOKENS_QUANTUM * math.ceil(max_new_tokens / NEW_TOKENS_QUANTUM)
        return B, T, new_cap, T + new_cap

    def _program(self, B: int, T: int, new_cap: int, n_eos: int = EOS_SLOTS,
                 background: bool = False) -> Future:
        """Future of the compiled program for these shapes: traced and lowered here, compiled (or
        fetched from XLA's persistent cache) here or, with `background`, in a thread (XLA runs
        without the GIL). Each shape is built once; later askers get the same future."""
        key, S = (B, T, T + new_cap, n_eos), T + new_cap
        with self._lock:
            fut = self._compiled.get(key)
            if fut is not None:
                return fut
            fut = self._compiled[key] = Future()
        try:
            state = self._fresh_state(B, S, new_cap)
            i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
            rs = RowSampling(jax.ShapeDtypeStruct((B,), jnp.float32), i32(B), jax.ShapeDtypeStruct((B,), jnp.float32))
            args = (self.model.params, state, i32(B, T), i32(B), jax.ShapeDtypeStruct((B,), bool), i32(B), i32(),
                    rs, i32(n_eos), jax.ShapeDtypeStruct((), bool), i32(), jax.ShapeDtypeStruct((B,), bool))
            m, fast = self.model, self.kernels.decode
            # int8_path: int16-path builds also take the int8 prefill's rows (a portable build refuses them)
            name = (f"generate {m.config!r} {m.dtype} {m.quant!r} {key} {self.kernels!r} "
                    f"int8_path={kernels.int8_path() if fast else None}")
            finish = program_cache.lower_cached(self._step, args, (1,), state, name)
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

    def prepare(self, n_prompts: int, longest_prompt: int, max_new_tokens: int) -> None:
        """Trace the program a request of this shape will run and start compiling it in a thread;
        returns once tracing is done (the CLI then parses the tokenizer while XLA compiles)."""
        B, T, new_cap, _ = self.shapes(n_prompts, longest_prompt, max_new_tokens)
        self._program(B, T, new_cap, background=True)

    def _step(self, params, state: LoopState, tokens, lengths, active, seeds, max_new, rs: RowSampling, eos, prefill_now, stop_at, host_done):
        apply = self.module.apply

        def stopped(tok, step, done_before):
            hit_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
            return done_before | hit_eos | (step + 1 >= max_new)

        def start(s: LoopState):
            logits, cache = prefill(apply, params, tokens, lengths, s.cache)
            first = jnp.where(active, sample(logits, row_keys(seeds, 0), rs, self.kernels), 0)
            return LoopState(cache, first, s.out.at[:, 0].set(first), jnp.int32(1),
                             stopped(first, 0, ~active))

        def body(s: LoopState):
            logits, cache = decode_step(apply, params, s.token, s.cache)
            tok = sample(logits, row_keys(seeds, s.step), rs, self.kernels)
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

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, rs: RowSampling,
            seeds: Sequence[int], eos: Sequence[int],
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
        fixed = (tokens, lengths, np.arange(B) < n, seed_arr, np.int32(max_new_tokens), pad_rows(rs, B),
                 eos_array(eos))
        program = self._program(B, T, new_cap, n_eos=fixed[-1].size).result()
        if getattr(self.model, "mesh", None) is None:  # on the device once, not at every streamed call
            fixed = jax.device_put(fixed)
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
        return np.asarray(gather(x))
    return np.asarray(x)
