"""Speculative decoding for greedy generation: a drafter proposes the next k tokens of each row,
one forward call of the model scores all k + 1 positions, and a row keeps the drafts that equal
the model's own greedy choice plus the model's token after them. Each call so yields 1 .. k + 1
tokens for one read of the weights (a decode step reads them all for one token), and the text
is plain greedy decoding's.

The KV cache is rolled back past rejected drafts by moving the row's index: slots past a row's
index are never attended to (the causal mask is over slots) and the next call overwrites them.

Drafters (`Drafter.propose(tokens, k)`):
  PromptLookup  the last n-gram of the row (prompt + generated so far), found earlier in the row:
                the tokens that followed it. No second model; input-grounded work (a summary or an
                answer quoting its passage) repeats spans of the prompt.

k adapts to the acceptance rate (`AdaptiveK`): it grows while drafts are accepted and shrinks
when they are not, down to 0 (plain decode steps, no drafting) when drafting stops paying, with a
retry every few calls. Each k in K_CHOICES is one compiled program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .engine import MIN_PROMPT_BUCKET, NEW_TOKENS_QUANTUM, bucket, prefill
from .sampling import argmax
from .sharding import init_cache

K_CHOICES = (0, 2, 4, 8)  # drafted tokens per call; 8 + 1 rows of one prompt still fit the CPU matvec kernel
DRAFTERS = ("prompt_lookup",)


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `tokens` (fewer, or none, when it has no guess)."""


class PromptLookup:
    """Drafts by prompt lookup: the longest of the row's last `max_ngram` .. `min_ngram` tokens
    that occurs earlier in the row, and the k tokens after its most recent earlier occurrence."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        seq = np.asarray(tokens, np.int64)
        L = len(seq)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:L - 1], n)  # starts 0 .. L - 1 - n
            hits = np.flatnonzero((windows == seq[L - n:]).all(axis=1))
            hits = hits[hits + n < L]  # something must follow the match
            if len(hits):
                start = int(hits[-1]) + n
                return seq[start:start + k].tolist()
        return []


def make_drafter(name: str) -> Drafter:
    if name == "prompt_lookup":
        return PromptLookup()
    raise ValueError(f"unknown speculative drafter {name!r}; choose one of {', '.join(DRAFTERS)}")


@dataclass
class SpeculativeStats:
    """calls: forward calls after the prefill; drafted / accepted: draft tokens proposed / kept."""

    calls: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Tokens a row gained per forward call (1 plus its accepted drafts), averaged."""
        return (self.calls + self.accepted) / self.calls if self.calls else 0.0


class AdaptiveK:
    """The next call's k from the last ones' acceptance: double it (up to K_CHOICES[-1]) when
    most drafts were accepted, halve it when few were, 0 after REST calls with nothing accepted
    (then one drafting call every REST calls to look again)."""

    REST = 8

    def __init__(self, start: int = 4):
        self.k, self.idle, self.since_try = start, 0, 0

    def next(self) -> int:
        if self.idle >= self.REST:
            self.since_try += 1
            if self.since_try < self.REST:
                return 0
            self.since_try = 0
            return K_CHOICES[1]
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.idle = 0 if accepted else self.idle + 1
        rate = accepted / drafted
        i = K_CHOICES.index(self.k) if self.k in K_CHOICES else 1
        if rate > 0.6:
            self.k = K_CHOICES[min(i + 1, len(K_CHOICES) - 1)]
        elif rate < 0.2:
            self.k = K_CHOICES[max(i - 1, 1)]


class Speculator:
    """Greedy speculative generation for one model (its engine's module: CPU kernels where the
    plain decode loop uses them). One prefill program per shape bucket, one verify program per k."""

    def __init__(self, model, module):
        self.model, self.module = model, module
        self._prefill = jax.jit(lambda params, tokens, lengths, cache: prefill(module.apply, params, tokens, lengths,
                                                                               cache), donate_argnums=3)
        self._verify: dict[int, Callable] = {}

    def verify_fn(self, k: int) -> Callable:
        """(params, cache, tokens [B, k + 1], drafts [B]) -> (greedy tokens [B, k + 1], accepted
        [B], cache with each row's index advanced past its last token and accepted drafts)."""
        if k not in self._verify:
            def verify(params, cache, tokens, n_drafts):
                out = self.module.apply({"params": params}, tokens, cache=cache)
                pred = argmax(out.logits)  # [B, k + 1]: the model's token after each position
                ok = (pred[:, :k] == tokens[:, 1:]) & (jnp.arange(k)[None, :] < n_drafts[:, None])
                accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
                return pred, accepted, {**out.cache, "index": cache["index"] + 1 + accepted}

            self._verify[k] = jax.jit(verify, donate_argnums=1)
        return self._verify[k]

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int], drafter: Drafter,
            host_step: Callable | None = None, stats: SpeculativeStats | None = None) -> list[list[int]]:
        """Greedy generation for validated token-id prompts; each row's tokens (ending with its
        first EOS, or at max_new_tokens, or where host_step flagged it). host_step(new tokens per
        row, first_step) -> bool [B] as in `Engine.run`, called after every forward call."""
        stats = stats if stats is not None else SpeculativeStats()
        n, eos = len(prompts), set(eos)
        B, T = bucket(n), bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
        S = T + NEW_TOKENS_QUANTUM * -(-max_new_tokens // NEW_TOKENS_QUANTUM) + K_CHOICES[-1] + 1
        tokens, lengths = np.zeros((B, T), np.int32), np.ones((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        cache = init_cache(self.model.config, B, S, self.model.cache_dtype)
        params = self.model.params
        logits, cache = self._prefill(params, tokens, lengths, cache)
        last = np.asarray(argmax(logits)).astype(np.int32)
        rows = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in range(n)]
        done = np.zeros((B,), bool)
        done[n:] = True

        def take(i: int, new: list[int]) -> list[int]:
            """Append row i's new tokens up to its first EOS / the limit; returns those kept."""
            kept = []
            for t in new:
                if done[i]:
                    break
                kept.append(t)
                done[i] = t in eos or len(out[i]) + len(kept) >= max_new_tokens
            out[i].extend(kept)
            rows[i].extend(kept)
            return kept

        fresh = [take(i, [int(last[i])]) for i in range(n)]
        first_step, adapt = True, AdaptiveK()
        while True:
            if host_step is not None:
                flagged = np.asarray(host_step(fresh + [[]] * (B - n), 0 if first_step else 1), bool)
                done[:n] |= flagged[:n]
            first_step = False
            if done.all():
                break
            k = adapt.next()
            block = np.zeros((B, k + 1), np.int32)
            n_drafts = np.zeros((B,), np.int32)
            for i in range(n):
                if done[i]:
                    continue
                room = max_new_tokens - len(out[i]) - 1  # the call always adds the model's own token
                drafts = drafter.propose(rows[i], min(k, room)) if k and room > 0 else []
                block[i, 0], block[i, 1:1 + len(drafts)], n_drafts[i] = rows[i][-1], drafts, len(drafts)
            pred, accepted, cache = self.verify_fn(k)(params, cache, block, n_drafts)
            pred, accepted = np.asarray(pred), np.asarray(accepted)
            active = ~done[:n]
            stats.calls += 1
            stats.drafted += int(n_drafts[:n][active].sum())
            stats.accepted += int(accepted[:n][active].sum())
            adapt.update(int(n_drafts[:n][active].sum()), int(accepted[:n][active].sum()))
            fresh = [take(i, pred[i, :accepted[i] + 1].tolist()) if active[i] else [] for i in range(n)]
        return out
