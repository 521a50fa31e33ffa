"""Sampling as pure functions of logits: greedy (argmax), temperature, top-k and top-p, one
token per row, with every setting a runtime value per row (`RowSampling`), so one compiled
program serves every mix of settings; a row's randomness depends only on its own seed and its
step (`row_keys`), so a row draws the same tokens whatever else is in its batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .kernels import XLA, KernelChoice


def argmax(x, choice: KernelChoice = XLA):
    """jnp.argmax over the last axis (the first maximum; the first NaN if any) as plain
    reductions: XLA's CPU backend runs argmax's (value, index) reduction element by element, about
    ten times slower than two plain reductions over a large vocabulary. NaN is looked for on its
    own: XLA's CPU max drops NaN for long rows. Decode programs on CPU (`choice.decode`) call
    the argmax kernel instead (`kernels.argmax`: the same index, one pass fewer, no small loops)."""
    if choice.decode:
        token = kernels.argmax(x)
        if token is not None:
            return token
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(jnp.isnan(x), axis=-1, keepdims=True), jnp.isnan(x), x == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


# Truncated rows (top-k, top-p) look for their set among this many most likely tokens first
# (lax.top_k), then among the next count, and sort all the logits (_sorted_draw) when neither
# holds it; a larger third count would cost about as much as the full sort (`python -m
# bench.profile_decode` times them)
CANDIDATES = (1024, 4096)
TOP_LOGPROBS = 20  # most alternatives a logprobs request may ask for (OpenAI's limit)


class RowSampling(NamedTuple):
    """Sampling settings, one value per row, as runtime arrays: every setting runs in the same
    compiled program (a new temperature, top-k or top-p never compiles one)."""

    temperature: Any  # [B] float32; 0 = greedy (argmax)
    top_k: Any  # [B] int32; 0 = off
    top_p: Any  # [B] float32; 1 = off


def rows(settings, vocab_size: int) -> RowSampling:
    """[(temperature, top_k or None, top_p or None)] per row -> RowSampling of numpy arrays; top_k
    at or beyond the vocabulary is off, as is top_p 1."""
    t = np.array([float(s[0]) for s in settings], np.float32)
    k = np.array([0 if s[1] is None or s[1] >= vocab_size else int(s[1]) for s in settings], np.int32)
    p = np.array([1.0 if s[2] is None else float(s[2]) for s in settings], np.float32)
    return RowSampling(t, k, p)


def pad_rows(rs: RowSampling, n: int) -> RowSampling:
    """Rows appended up to n (greedy: the cheapest)."""
    fill = lambda a, v: np.concatenate([a, np.full((n - len(a),), v, a.dtype)])
    return RowSampling(fill(rs.temperature, 0.0), fill(rs.top_k, 0), fill(rs.top_p, 1.0))


def sample(logits, keys, rs: RowSampling, choice: KernelChoice = XLA):
    """logits [B, V] float32, keys [B] PRNG keys, per-row settings -> tokens [B] int32.

    Order as in transformers: temperature, then top-k, then top-p (smallest set of tokens
    whose probability mass reaches top_p, under the softmax renormalised over the top-k set when
    there is one; the most likely token is always kept). Rows without truncation draw from the
    whole softmax (_blocked_draw); truncated rows from their most likely tokens, sorted (a lax.top_k
    of CANDIDATES[0] when it holds every such row's set, else the next count, else a full sort).
    The noise of a truncated draw is by sorted position, and jax's threefry noise for n positions
    is the first n of a longer run's (jax_threefry_partitionable), so a row draws the same token
    whichever count its batch needed (tested): a row's token depends only on its logits, its
    settings and its key. Costly parts run only when some row needs them (lax.cond): a batch of
    greedy rows costs one argmax (the kernel's in decode programs on CPU: `choice`, see `argmax`).
    Rows with NaN / +inf logits give argmax's token.
    """
    greedy = rs.temperature <= 0
    truncated = (rs.top_k > 0) | (rs.top_p < 1)
    zeros = lambda: jnp.zeros(logits.shape[:1], jnp.int32)

    def sampled():
        z = logits / jnp.where(greedy, 1.0, rs.temperature)[:, None]
        plain = jax.lax.cond(jnp.any(~greedy & ~truncated), lambda: _draw(keys, z), zeros)
        need = ~greedy & truncated
        counts = tuple(n for n in CANDIDATES if n < z.shape[-1])
        cut = jax.lax.cond(jnp.any(need), lambda: _truncated(keys, z, rs.top_k, rs.top_p,
                                                             jax.nn.logsumexp(z, axis=-1, keepdims=True), need, counts),
                           zeros)
        token = jnp.where(greedy, argmax(logits, choice), jnp.where(truncated, cut, plain))
        return _argmax_where_no_softmax(logits, token, jnp.max(logits, axis=-1))

    return jax.lax.cond(jnp.any(~greedy), sampled, lambda: argmax(logits, choice))


def _truncated(keys, z, top_k, top_p, lse, need, counts):
    """Truncated draws among the counts[0] most likely tokens where that holds every needing row's
    set, else the next count's for the rows it does not hold, else all V sorted."""
    if not counts:
        return _sorted_draw(keys, z, top_k, top_p, lse)
    best, index = jax.lax.top_k(z, counts[0])
    rank = _masked_draw(keys, best, top_k, top_p, lse)
    token = jnp.take_along_axis(index, rank[:, None], axis=-1)[:, 0]
    held = jnp.where(top_k > 0, top_k <= counts[0], jnp.sum(jnp.exp(best - lse), axis=-1) >= top_p)
    return jax.lax.cond(jnp.all(held | ~need), lambda: token,
                        lambda: jnp.where(held, token, _truncated(keys, z, top_k, top_p, lse, need, counts[1:])))


def _masked_draw(keys, best, top_k, top_p, lse):
    """The drawn rank per row among logits `best` [B, n] sorted descending: the top_k first (0:
    all), then the top-p set of those (probabilities renormalised over the top-k set when there
    is one, else the full softmax's, `lse` its log-normaliser); Gumbel-max, noise by position."""
    rank = jax.lax.broadcasted_iota(jnp.int32, best.shape, 1)
    k_on = (top_k > 0)[:, None]
    keep = ~k_on | (rank < top_k[:, None])
    lse = jnp.where(k_on, jax.nn.logsumexp(jnp.where(keep, best, -jnp.inf), axis=-1, keepdims=True), lse)
    probs = jnp.where(keep, jnp.exp(best - lse), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (top_p[:, None] >= 1.0) | (mass_before < top_p[:, None])
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, best.shape[-1:], best.dtype))(keys)
    return argmax(jnp.where(keep, best, -jnp.inf) + gumbel)


def _descending_key(x):
    """float32 -> uint32 whose ascending order is x's descending order (-0.0 taken as 0.0); its
    own inverse on the bits. XLA's CPU sort orders these several times faster than the floats,
    and faster still than argsort (values with indices)."""
    b = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.uint32)
    return _flip(b)


def _flip(b):
    return jnp.where(b >> 31 == 1, b, ~b & jnp.uint32(0x7FFFFFFF))


def _sorted_draw(keys, logits, top_k, top_p, lse):
    """A truncated draw over all V logits sorted: the token a stable argsort of -logits would give
    (`_masked_draw` over the sorted logits), with only the keys sorted; the drawn rank's
    vocabulary id is found after: the (rank - first rank of its value)-th logit equal to it, in
    vocabulary order. Rows with NaN / +inf logits give argmax's token, as the other draws do."""
    key = _descending_key(logits)
    ordered = jnp.sort(key, axis=-1)
    best = jax.lax.bitcast_convert_type(_flip(ordered), jnp.float32)
    rank = _masked_draw(keys, best, top_k, top_p, lse)
    value = jnp.take_along_axis(ordered, rank[:, None], axis=-1)
    equal = key == value
    nth = rank - jnp.sum(key < value, axis=-1)  # 0 unless the drawn value is tied
    iota = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
    lowest = lambda mask: jnp.min(jnp.where(mask, iota, key.shape[-1]), axis=-1)
    # the cumsum over V (a full pass) only when some row drew a tied value past its first
    tied = lambda: lowest(equal & (jnp.cumsum(equal, axis=-1, dtype=jnp.int32) == nth[:, None] + 1))
    token = jax.lax.cond(jnp.any(nth > 0), tied, lambda: lowest(equal))
    return _argmax_where_no_softmax(logits, token, jnp.max(logits, axis=-1)).astype(jnp.int32)


def _draw(keys, logits):
    """A token per row from the whole softmax of logits [B, n]: blocked (_blocked_draw) over
    large vocabularies, else jax.random.categorical's Gumbel-max draw (the same numbers, so the
    same tokens) with argmax."""
    if logits.shape[-1] >= BLOCKED_DRAW_MIN:
        return _blocked_draw(keys, logits)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
    return argmax(logits + gumbel).astype(jnp.int32)


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


def truncated_logits(logits, rs: RowSampling):
    """logits [N, V] -> the logits of each row's sampling distribution: divided by its temperature,
    -inf outside its top-k / top-p set (the set `sample` draws from; a token tied with the set's
    last one is kept too), so softmax of the result is the distribution `sample` draws from."""
    z = logits / jnp.where(rs.temperature > 0, rs.temperature, 1.0)[:, None]
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    truncated = (rs.top_k > 0) | (rs.top_p < 1)

    def threshold(best):  # the smallest logit of each row's set, from its logits sorted descending
        rank = jax.lax.broadcasted_iota(jnp.int32, best.shape, 1)
        k_on = (rs.top_k > 0)[:, None]
        keep = ~k_on | (rank < rs.top_k[:, None])
        lse_k = jnp.where(k_on, jax.nn.logsumexp(jnp.where(keep, best, -jnp.inf), axis=-1, keepdims=True), lse)
        probs = jnp.where(keep, jnp.exp(best - lse_k), 0.0)
        keep &= (rs.top_p[:, None] >= 1.0) | (jnp.cumsum(probs, axis=-1) - probs < rs.top_p[:, None])
        return jnp.take_along_axis(best, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)

    n = min(CANDIDATES[0], z.shape[-1])
    best = jax.lax.top_k(z, n)[0]
    held = jnp.where(rs.top_k > 0, rs.top_k <= n, jnp.sum(jnp.exp(best - lse), axis=-1) >= rs.top_p)
    cut = jax.lax.cond(jnp.all(held | ~truncated), lambda: threshold(best),
                       lambda: threshold(-jnp.sort(-z, axis=-1)))
    return jnp.where(~truncated[:, None] | (z >= cut), z, -jnp.inf)


def speculative_accept(logits, drafts, n_drafts, keys, rs: RowSampling):
    """Speculative sampling (rejection sampling against drafts proposed deterministically, as
    prompt lookup and greedy drafters do): logits [B, k + 1, V] of the target after the row's last
    token and each of its k drafts [B, k] (the first n_drafts [B] real). Draft j is accepted with
    its probability under the target's sampling distribution p_j; at the first rejection the
    token is drawn from p_j without the draft (the residual max(p - q, 0) for a one-hot q), and
    when every draft is accepted one more is drawn from p_n. So each emitted token follows the
    target's distribution exactly. -> (tokens [B, k + 1]: the accepted drafts then the drawn
    token, accepted [B])."""
    B, K1, V = logits.shape
    k = K1 - 1
    wide = lambda a: jnp.repeat(a, K1, axis=0)
    z = truncated_logits(logits.reshape(B * K1, V), RowSampling(*(wide(a) for a in rs))).reshape(B, K1, V)
    lse = jax.nn.logsumexp(z[:, :k], axis=-1)
    p_draft = jnp.exp(jnp.take_along_axis(z[:, :k], drafts[:, :, None], axis=-1)[..., 0] - lse)  # [B, k]
    split = jax.vmap(lambda key: jax.random.split(key, 2))(keys)
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(split[:, 0])
    ok = (u < p_draft) & (jnp.arange(k)[None, :] < n_drafts[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    at = jnp.take_along_axis(z, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    rejected = jnp.take_along_axis(jnp.pad(drafts, ((0, 0), (0, 1))), accepted[:, None], axis=1)[:, 0]
    at = jnp.where((accepted < n_drafts)[:, None] & (jnp.arange(V)[None, :] == rejected[:, None]), -jnp.inf, at)
    final = _draw(split[:, 1], at)
    j = jnp.arange(K1)[None, :]
    tokens = jnp.where(j < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), final[:, None])
    return tokens.astype(jnp.int32), accepted


def row_keys(seeds, step):
    """Per-row keys: a row's randomness depends only on its own seed and its step (a scalar for
    every row, or one step per row: a server's rows are at different steps)."""
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), jnp.shape(seeds))
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)


def logprobs(logits, tokens, n_top: int = TOP_LOGPROBS):
    """The model's log-probabilities (log-softmax of the raw logits, before temperature and
    truncation, as OpenAI reports them): of `tokens` [B] -> [B], and the n_top most likely
    (ids [B, n_top], log-probabilities [B, n_top])."""
    lsm = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    top_lp, top_ids = jax.lax.top_k(lsm, n_top)
    return jnp.take_along_axis(lsm, tokens[:, None], axis=-1)[:, 0], top_ids, top_lp
