"""Speculative decoding: a drafter proposes the next k tokens of each row, one forward call of
the model scores all k + 1 positions, and a row keeps the drafts the model agrees with plus one
token of the model's own. Each call so yields 1 .. k + 1 tokens for one read of the weights (a
decode step reads them all for one token). Greedy: a draft is kept when it equals the model's
argmax, so the text is plain greedy decoding's. Sampling: a draft is kept with its probability
under the model's sampling distribution and the first rejected one is replaced by a draw from
the rest of that distribution (`sampling.speculative_accept`), so every token follows the model's
distribution exactly (not the same tokens as plain sampling with that seed: the draws differ).

The KV cache is rolled back past rejected drafts by moving the row's index: slots past a row's
index are never attended to (the causal mask is over slots) and the next call overwrites them.

Drafters (`Drafter.propose(tokens, k)`):
  PromptLookup  the last n-gram of the row (prompt + generated so far), found earlier in the row:
                the tokens that followed it. No second model; input-grounded work (a summary or an
                answer quoting its passage) repeats spans of the prompt.

k adapts to the acceptance rate (`AdaptiveK`): it grows while drafts are accepted and shrinks
when they are not, down to 0 when drafting stops paying: then a fused loop of REST plain decode
steps runs in one call (as the plain engine does), with a drafting call every REST calls to look
again. A call where the drafter has nothing to propose for any row runs NO_DRAFT_STEPS plain steps
fused instead of a verify call (a verify call of k + 1 positions costs more than a step). Each k
in K_CHOICES is one compiled program, and the fused loop one more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .engine import NEW_TOKENS_QUANTUM, bucket, prefill, prompt_bucket
from .kernels import KernelChoice
from .models import registry
from .quant import QuantConfig
from .sampling import RowSampling, argmax, pad_rows, row_keys, rows, sample, speculative_accept
from .sharding import init_cache

NO_DRAFT_STEPS = 4  # plain steps fused when no row has a draft (the drafter is asked again after them)
K_CHOICES = (0, 2, 4, 8)  # drafted tokens per call; 8 + 1 rows of one prompt still fit the CPU matvec kernel
SELF_MODES = ("int8", "int4", "bfloat16")
DRAFTERS = ("prompt_lookup", "self:int8", "self:int4", "self:bfloat16", "a draft Model")


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


class ModelDrafter:
    """Drafts with a second model sharing the target's tokenizer (a smaller one, or the target
    itself quantized: a self-draft), greedily, k tokens per call in one program, with its own KV
    cache kept in step with the target's rows. Each call feeds the row's last two tokens at their
    positions (rewriting the one before is harmless: the same token gives the same keys), so the
    cache needs no other repair after rejected drafts: slots past a row's length are never read
    before they are written again."""

    def __init__(self, draft):
        self.model = draft
        self.module = registry.build(draft.config, draft.dtype, dot_general_cls=draft.dot_general_cls,
                                     kernels=KernelChoice(decode=kernels.usable(draft)))
        self._prefill = jax.jit(lambda params, tokens, lengths, cache: prefill(self.module.apply, params, tokens,
                                                                               lengths, cache)[1], donate_argnums=3)
        self._draft: dict[int, Callable] = {}
        self.cache = None

    def start(self, tokens: np.ndarray, lengths: np.ndarray, S: int) -> None:
        """Prefill the prompts (right-padded [B, T]) into a fresh draft cache of S slots."""
        cache = init_cache(self.model.config, tokens.shape[0], S, self.model.cache_dtype)
        self.cache = self._prefill(self.model.params, tokens, lengths, cache)

    def _program(self, k: int) -> Callable:
        if k not in self._draft:
            def draft(params, cache, last2, lengths):
                out = self.module.apply({"params": params}, last2, cache={**cache, "index": lengths - 2})
                token = argmax(out.logits[:, -1], self.module.kernels)

                def body(i, carry):
                    cache, token, drafts = carry
                    o = self.module.apply({"params": params}, token[:, None], cache=cache)
                    token = argmax(o.logits[:, 0], self.module.kernels)
                    return o.cache, token, drafts.at[:, i].set(token)

                drafts = jnp.zeros((last2.shape[0], k), jnp.int32).at[:, 0].set(token)
                cache, _, drafts = jax.lax.fori_loop(1, k, body, (out.cache, token, drafts))
                return drafts, cache

            self._draft[k] = jax.jit(draft, donate_argnums=1)
        return self._draft[k]

    def propose_batch(self, rows: Sequence[Sequence[int]], k: int) -> np.ndarray:
        """[B, k] greedy drafts after each row (rows: B token lists, each of at least 2 tokens)."""
        last2 = np.asarray([r[-2:] for r in rows], np.int32)
        lengths = np.asarray([len(r) for r in rows], np.int32)
        drafts, self.cache = self._program(k)(self.model.params, self.cache, last2, lengths)
        return np.asarray(drafts)


def parse_drafter(name) -> tuple[str, str | None]:
    """"prompt_lookup" | "self:MODE" (MODE in SELF_MODES) -> (kind, MODE or None); a Model-like
    object (config + params) -> ("draft", None); anything else is refused by name."""
    if hasattr(name, "config") and hasattr(name, "params"):
        return "draft", None
    kind, _, arg = name.partition(":") if isinstance(name, str) else ("", "", "")
    if (kind == "prompt_lookup" and not arg) or (kind == "self" and arg in SELF_MODES):
        return kind, arg or None
    raise ValueError(f"unknown speculative drafter {name!r}; choose one of {', '.join(DRAFTERS)}")


def check_draft(model, draft) -> None:
    """A draft model must share the target's tokenizer: the same vocabulary size and special ids."""
    if draft.config.family == "bert" or draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"this draft model cannot draft for the target: its vocabulary has {draft.config.vocab_size} "
                         f"tokens and the target's {model.config.vocab_size} (a draft model must share the target's "
                         "tokenizer)")
    t, d = model.tokenizer, draft.tokenizer
    if t is not None and d is not None and any(getattr(t, f"{n}_token_id", None) != getattr(d, f"{n}_token_id", None)
                                               for n in ("bos", "eos")):
        raise ValueError("this draft model has other special tokens than the target (its BOS / EOS ids differ): a "
                         "draft model must share the target's tokenizer")


def make_drafter(spec, model) -> Drafter | ModelDrafter:
    """The drafter `spec` names for the target `model` (`parse_drafter`): prompt lookup, the
    target quantized (a self-draft), or a draft Model."""
    kind, arg = parse_drafter(spec)
    if kind == "prompt_lookup":
        return PromptLookup()
    if kind == "self":
        return ModelDrafter(model.quantize(QuantConfig(mode=arg)))
    check_draft(model, spec)
    return ModelDrafter(spec)


@dataclass
class SpeculativeStats:
    """calls: forward passes after the prefill (a verify call is one, a fused run of m plain steps
    m); drafted / accepted: draft tokens proposed / kept."""

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
    """Speculative generation for one model (its engine's module: CPU kernels where the plain
    decode loop uses them). One prefill program per shape bucket, one verify program per (k,
    greedy or sampled), and one fused loop of AdaptiveK.REST plain steps."""

    def __init__(self, model, module):
        self.model, self.module = model, module

        def first(params, tokens, lengths, cache, seeds, rs):
            logits, cache = prefill(module.apply, params, tokens, lengths, cache)
            return sample(logits, row_keys(seeds, 0), rs, module.kernels), cache

        self._prefill = jax.jit(first, donate_argnums=3)
        self._verify: dict[tuple[int, bool], Callable] = {}
        self._plain = jax.jit(self._plain_steps, donate_argnums=1)

    def _plain_steps(self, params, cache, token, seeds, steps, rs, n):
        """n <= AdaptiveK.REST plain decode steps in one call (no drafting): tokens [B, REST], the first n real."""
        def body(i, carry):
            cache, token, out = carry
            out_ = self.module.apply({"params": params}, token[:, None], cache=cache)
            token = sample(out_.logits[:, 0], row_keys(seeds, steps + i), rs, self.module.kernels)
            return out_.cache, token, out.at[:, i].set(token)

        out = jnp.zeros((token.shape[0], AdaptiveK.REST), jnp.int32)
        cache, _, out = jax.lax.fori_loop(0, n, body, (cache, token, out))
        return out, cache

    def verify_fn(self, k: int, greedy: bool = True) -> Callable:
        """(params, cache, tokens [B, k + 1], drafts [B], seeds, steps, rs) -> (tokens [B, k + 1]
        (row b's first accepted[b] + 1 are its new tokens), accepted [B], cache with each row's
        index advanced past its last token and accepted drafts)."""
        if (k, greedy) not in self._verify:
            def verify(params, cache, tokens, n_drafts, seeds, steps, rs):
                out = self.module.apply({"params": params}, tokens, cache=cache)
                if greedy:
                    pred = argmax(out.logits, self.module.kernels)  # [B, k + 1]: the model's token after each position
                    ok = (pred[:, :k] == tokens[:, 1:]) & (jnp.arange(k)[None, :] < n_drafts[:, None])
                    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
                else:
                    pred, accepted = speculative_accept(out.logits, tokens[:, 1:], n_drafts, row_keys(seeds, steps), rs)
                return pred, accepted, {**out.cache, "index": cache["index"] + 1 + accepted}

            self._verify[(k, greedy)] = jax.jit(verify, donate_argnums=1)
        return self._verify[(k, greedy)]

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int], drafter: Drafter,
            host_step: Callable | None = None, stats: SpeculativeStats | None = None,
            rs: RowSampling | None = None, seeds: Sequence[int] | None = None) -> list[list[int]]:
        """Generation for validated token-id prompts; each row's tokens (ending with its first EOS,
        or at max_new_tokens, or where host_step flagged it). host_step(new tokens per row,
        first_step) -> bool [B] as in `Engine.run`, called after every forward call. rs / seeds:
        per-row sampling settings (engine's arrays; None: greedy) and seeds."""
        stats = stats if stats is not None else SpeculativeStats()
        n, eos = len(prompts), set(eos)
        B, T = bucket(n), prompt_bucket(max(len(p) for p in prompts))
        S = T + NEW_TOKENS_QUANTUM * -(-max_new_tokens // NEW_TOKENS_QUANTUM) + max(K_CHOICES[-1] + 1, AdaptiveK.REST)
        tokens, lengths = np.zeros((B, T), np.int32), np.ones((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        rs = pad_rows(rs if rs is not None else rows([(0.0, None, None)] * n, self.model.config.vocab_size), B)
        greedy = bool(np.all(rs.temperature <= 0))
        seed_arr = np.zeros((B,), np.int32)
        seed_arr[:n] = seeds if seeds is not None else 0
        cache = init_cache(self.model.config, B, S, self.model.cache_dtype)
        params = self.model.params
        last, cache = self._prefill(params, tokens, lengths, cache, seed_arr, rs)
        last = np.asarray(last)
        batched = hasattr(drafter, "propose_batch")
        if batched:
            drafter.start(tokens, lengths, S)
        rows_ = [list(p) for p in prompts]
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
            rows_[i].extend(kept)
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
            steps = np.array([len(o) for o in out] + [0] * (B - n), np.int32)  # each row's sampling step
            k = adapt.next()
            block = np.zeros((B, k + 1), np.int32)
            n_drafts = np.zeros((B,), np.int32)
            proposed = drafter.propose_batch(rows_ + [rows_[0]] * (B - n), k) if k and batched else None
            for i in range(n if k else 0):
                if done[i]:
                    continue
                room = max_new_tokens - len(out[i]) - 1  # the call always adds the model's own token
                drafts = [] if room <= 0 else (proposed[i, :min(k, room)].tolist() if batched
                                               else drafter.propose(rows_[i], min(k, room)))
                block[i, 0], block[i, 1:1 + len(drafts)], n_drafts[i] = rows_[i][-1], drafts, len(drafts)
            if not n_drafts.any():  # resting, or nothing to propose: plain steps in one call
                m = AdaptiveK.REST if k == 0 else NO_DRAFT_STEPS
                new, cache = self._plain(params, cache, np.array([r[-1] for r in rows_] + [0] * (B - n), np.int32),
                                         seed_arr, steps, rs, np.int32(m))
                new = np.asarray(new)[:, :m]
                stats.calls += m
                fresh = [take(i, new[i].tolist()) if not done[i] else [] for i in range(n)]
                continue
            pred, accepted, cache = self.verify_fn(k, greedy)(params, cache, block, n_drafts, seed_arr, steps, rs)
            pred, accepted = np.asarray(pred), np.asarray(accepted)
            active = ~done[:n]
            stats.calls += 1
            stats.drafted += int(n_drafts[:n][active].sum())
            stats.accepted += int(accepted[:n][active].sum())
            adapt.update(int(n_drafts[:n][active].sum()), int(accepted[:n][active].sum()))
            fresh = [take(i, pred[i, :accepted[i] + 1].tolist()) if active[i] else [] for i in range(n)]
        return out
