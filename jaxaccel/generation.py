"""The public generation API: `generate` (text in, text out, streaming, stop strings),
`generate_tokens` (ids), `prepare` (compile ahead). Checks every argument before any device
work, then runs the model's `engine.Engine`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .engine import Engine
from .sampling import RowSampling, rows
from .speculative import SpeculativeStats, Speculator, check_draft, make_drafter, parse_drafter
from .streaming import TextStreamer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = float("nan")
    total_time: float = float("nan")
    speculative: SpeculativeStats | None = None  # drafts proposed / accepted, with `speculative=`

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding."""
        return max(self.generated_tokens - 1, 0) / max(self.total_time - self.time_to_first_token, 1e-9)


def _engine(model) -> Engine:
    eng = model.__dict__.get("_engine")
    if eng is None:
        eng = model.__dict__["_engine"] = Engine(model)
    return eng


def _speculator(model) -> Speculator:
    spec = model.__dict__.get("_speculator")
    if spec is None:
        spec = model.__dict__["_speculator"] = Speculator(model, _engine(model).module)
    return spec


def _drafter(model, speculative):
    """The drafter for `speculative`, built once per model and kept (a self-draft quantizes the
    model; a draft Model builds its module)."""
    drafters = model.__dict__.setdefault("_drafters", {})
    key = speculative if isinstance(speculative, str) else id(speculative)
    if key not in drafters:
        drafters[key] = make_drafter(speculative, model)
    return drafters[key]


def _check_speculative(model, speculative) -> None:
    if speculative is None:
        return
    if parse_drafter(speculative)[0] == "draft":  # an unknown drafter is refused by name
        check_draft(model, speculative)
    if getattr(model, "mesh", None) is not None:
        raise ValueError("speculative decoding on a device mesh is not supported yet; load the model without mesh=")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float, np.number)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


SEED_RANGE = (-(2**31), 2**32)  # int32 and uint32 seeds; a uint32 one wraps to the int32 with its bits


def _seeds(seed, n: int) -> list[int]:
    """`seed` (one integer, or one per prompt) -> n int32 seeds."""
    seeds = [seed] * n if np.isscalar(seed) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    for s in seeds:
        if not _is_int(s) or not SEED_RANGE[0] <= s < SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [-2**31, 2**32), got {s!r}")
    return [int(s) - 2**32 if s >= 2**31 else int(s) for s in seeds]


def _check_room(model, n_prompts: int, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuse, before anything is allocated, a request beyond the model's positions or larger
    than the memory its KV cache would take."""
    limit = model.config.max_position_embeddings
    if longest_prompt + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest_prompt} tokens with max_new_tokens={max_new_tokens} needs "
            f"{longest_prompt + max_new_tokens} positions but the model has {limit}; shorten the prompt "
            "or lower max_new_tokens")
    need = Engine.cache_bytes(model, n_prompts, longest_prompt, max_new_tokens)
    free = _free_memory()
    if free is not None and need > free:
        raise ValueError(f"this request's KV cache needs {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB of memory "
                         "is free; lower max_new_tokens or the number of prompts")


def _free_memory() -> int | None:
    """Bytes free where generation runs: the accelerator's memory, else the host's."""
    import jax
    import psutil

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(psutil.virtual_memory().available)


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
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt {i} is not valid text: character {e.start} is a lone surrogate "
                                 f"(U+{ord(p[e.start]):04X}); pass text decoded from UTF-8") from None
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


def make_rows(model, n: int, temperature: float, top_k: int | None, top_p: float | None) -> RowSampling:
    """The same settings for n rows, as the engine's runtime arrays."""
    return rows([(temperature, top_k, top_p)] * n, model.config.vocab_size)


def prepare(model, n_prompts: int, prompt_tokens: int, max_new_tokens: int = 32, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None) -> None:
    """Trace the program that `generate` will run for this shape (its bucket of `prompt_tokens`;
    the sampling settings are runtime values, checked here only) and compile it in a thread;
    returns after tracing. Optional: generate compiles on demand, and waits for a compile already
    in progress."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_room(model, n_prompts, prompt_tokens, max_new_tokens)
    _engine(model).prepare(n_prompts, prompt_tokens, max_new_tokens)


def generate_tokens(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed=0,
                    host_step: Callable | None = None, speculative: str | None = None,
                    stats: GenerationStats | None = None) -> list[list[int]]:
    """Token-level generation: prompts (strings or id lists) -> generated ids per prompt.

    The ids stop after the first EOS (which is included) or at `max_new_tokens`.
    `seed` is an int for all rows or one int per prompt; a row's samples depend only on its
    own seed, so the same seed gives the same tokens whatever else is in the batch.
    speculative: "prompt_lookup" drafts tokens from the prompt, "self:int8" (or "self:int4",
    "self:bfloat16") with the model itself quantized, a Model sharing the tokenizer with that
    model; several drafts are verified per forward call: greedy gives the same tokens as without
    it; sampling the same distribution (other draws than without it for a seed); see speculative.py.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_speculative(model, speculative)
    return _generate_ids(model, encode_prompts(model, prompts), max_new_tokens, temperature, top_k, top_p, seed,
                         host_step, speculative, stats)


def _generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, host_step, speculative=None,
                  stats=None) -> list[list[int]]:
    """`generate_tokens` for prompts already encoded and checked (`encode_prompts`)."""
    limit = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions but the model has {limit}; shorten the prompt "
                "or lower max_new_tokens")
    seeds = _seeds(seed, len(ids))
    _check_room(model, len(ids), max(map(len, ids)), max_new_tokens)
    eos = _eos_ids(model)
    rs = make_rows(model, len(ids), temperature, top_k, top_p)
    if speculative is not None:
        spec = SpeculativeStats()
        if stats is not None:
            stats.speculative = spec
        return _speculator(model).run(ids, max_new_tokens, eos, _drafter(model, speculative), host_step, spec, rs,
                                      seeds)
    out = _engine(model).run(ids, max_new_tokens, rs, seeds, eos, host_step)
    result = []
    for row in out:
        row = row.tolist()
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        result.append(row if stop is None else row[: stop + 1])
    return result


def generate(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed=0,
             stop: Sequence[str] | str | None = None,
             stream: Callable[[int, str], Any] | None = None,
             stats: GenerationStats | None = None, speculative: str | None = None) -> list[str]:
    """Generate continuations (prompt excluded) of each prompt.

    prompts: list of strings or token-id lists. temperature 0 = greedy. stop: strings that end
    a row (excluded from the text). stream(i, text) receives new text of prompt i as it is
    produced. Pass a `GenerationStats` to get time to first token and throughput.
    speculative: "prompt_lookup" for speculative decoding (see `generate_tokens`).
    """
    if model.tokenizer is None:
        raise ValueError("generate() returns text and needs a tokenizer; this model has none. "
                         "Use jaxaccel.generate_tokens() for token ids.")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_speculative(model, speculative)
    ids = encode_prompts(model, prompts)
    streamer = TextStreamer(model, len(ids), stop, stream, _eos_ids(model))
    start = time.perf_counter()
    _generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, streamer, speculative, stats)
    texts = streamer.flush()
    end = time.perf_counter()
    if stats is not None:
        stats.prompt_tokens = sum(len(p) for p in ids)
        stats.generated_tokens = sum(len(r) for r in streamer.ids)
        stats.time_to_first_token = (streamer.first_token_at or end) - start
        stats.total_time = end - start
    return texts
