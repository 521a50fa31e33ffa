"""Sampling as pure functions of logits: greedy (argmax), temperature, top-k and top-p, one
token per row; a row's randomness depends only on its own seed and the step (`row_keys`), so a
row draws the same tokens whatever else is in its batch.

`Sampler` is the static part (it selects the traced program); temperature and top_p are runtime
values. Order as in transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

@dataclass(frozen=True)
class Sampler:
    """Static part of sampling (changes the program); temperature/top_p values are dynamic."""

    greedy: bool = True
    top_k: int | None = None
    top_p: bool = False


def argmax(x):
    """jnp.argmax over the last axis (the first maximum; the first NaN if any) as plain
    reductions: XLA's CPU backend runs argmax's (value, index) reduction element by element, about
    ten times slower than two plain reductions over a large vocabulary. NaN is looked for on its
    own: XLA's CPU max drops NaN for long rows."""
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(jnp.isnan(x), axis=-1, keepdims=True), jnp.isnan(x), x == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


# top-p alone looks for its set among this many most likely tokens first (lax.top_k), then among
# the next count, and sorts all the logits (_top_p_sorted) when neither holds it; a larger third
# count would cost about as much as the full sort (`python -m bench.profile_decode` times them)
TOP_P_CANDIDATES = (1024, 4096)


def sample(logits, keys, temperature, top_p, sampler: Sampler):
    """logits [B, V] float32, keys [B] PRNG keys -> tokens [B] int32.

    Order as in transformers: temperature, then top-k, then top-p (smallest set of tokens
    whose probability mass reaches top_p; the most likely token is always kept).
    Top-p alone sorts only the TOP_P_CANDIDATES[0] most likely tokens (lax.top_k) when they hold
    top_p of the mass, which decides the same set as sorting all V, else the next count's, and
    sorts all V only when neither holds it (flat distributions), as uint32 keys (several times
    faster than XLA's argsort on CPU). Natural text at top_p 0.95 rarely needs more than the
    first count; prompts of random ids or temperatures above 1 flatten the distribution.
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
    own inverse on the bits. XLA's CPU sort orders these several times faster than the floats,
    and faster still than argsort (values with indices)."""
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
    # the cumsum over V (a full pass) only when some row drew a tied value past its first
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
    P(block) * P(token | block) is the token's softmax probability. Threefry noise for a whole
    large vocabulary costs a noticeable part of a decode step on CPU; this draws ~V / 256 times
    fewer values. NaN / +inf logits pick the first of them, as argmax does."""
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


def row_keys(seeds, step):
    """Per-row keys: a row's randomness depends only on its own seed and the step."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(seeds)
