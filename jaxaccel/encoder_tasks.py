"""Encoder inference: sentence embeddings, fill-mask and classification over many texts.

Throughput plan: every text is tokenized and checked on the host first (bad input fails
before device work); texts are sorted by length and cut into batches of batch_size; each
batch is padded to a length bucket (`LENGTH_BUCKETS`, capped at the model's max length) and
the one short batch to a fixed batch shape (`batch_shapes(batch_size)`: 1, 8, batch_size),
so a long mixed-length corpus compiles at most len(buckets) x len(batch shapes) programs
per task. Results come back in input order.

`embed` packs instead (`pack=True`, the default): texts of up to `pack_width(model)` tokens are
laid end to end in rows that long (first-fit decreasing), each text with its own segment id
(attention stays inside a text) and positions from 0, and mean-pooled per segment. XLA's
attention scores every pair of a row, so without the CPU attention kernel rows are PACK_WIDTH
(64) tokens and longer texts take the bucketed path; the kernel scores only pairs inside a text,
so with it rows are as long as the model allows and every text packs, with almost no padding
(`python -m bench.encoder` reports the tokens each layout computes).
"""

from __future__ import annotations

import bisect
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from .engine import prompt_bucket
from .kernels import KernelChoice
from .models import registry

# 16, 24, 32, 48, ..., 512: the half-octave steps decoder prompts pad to too (<= ~30% padding on average)
LENGTH_BUCKETS = tuple(sorted({prompt_bucket(n) for n in range(1, 513)}))
DEFAULT_BATCH = 32
PACK_WIDTH = 64  # embed packs texts of up to this many tokens into rows this long (bench.encoder: best of 48-128)
KERNEL_PACK_WIDTH = 512  # ... and up to this many (capped at the max length) with the CPU attention kernel


@dataclass
class EncodeStats:
    """What a call did: texts, how many were truncated, real vs padded tokens, batches run."""

    texts: int = 0
    truncated: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated_rows: tuple[int, ...] = ()


def max_length(model) -> int:
    """Longest input in tokens: the position table, or the tokenizer's (sentence-transformers') limit."""
    limit = model.config.max_position_embeddings
    tok_limit = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return limit


def length_buckets(limit: int) -> tuple[int, ...]:
    return tuple(b for b in LENGTH_BUCKETS if b < limit) + (limit,)


def batch_shapes(batch_size: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in (1, 8) if b < batch_size} | {batch_size}))


def _tokenize_into(stats: EncodeStats, model, texts, truncate, where, pairs: bool = False):
    ids, long, types = tokenize(model, texts, truncate, where, pairs)
    stats.texts, stats.truncated, stats.truncated_rows = len(ids), len(long), tuple(long)
    return (ids, types) if pairs else ids


def _default_where(i: int) -> str:
    return f"text {i}"


def _check_encoder(model, need: str | None = None):
    if model.config.causal:
        raise ValueError(f"{model.config.family} is a decoder LM; embed / fill_mask / classify need an encoder (BERT)")
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer (the folder lacks tokenizer files); pass token ids instead")
    if need and model.config.head != need:
        raise ValueError(f"this checkpoint has a {model.config.head!r} head; {need!r} is needed "
                         f"(e.g. a {'BertForMaskedLM' if need == 'masked_lm' else 'BertForSequenceClassification'} folder)")


def is_pair(item) -> bool:
    """A sentence pair: (text, text_pair), a tuple or list of two strings."""
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)


def _encode(tok, items: list, **kw) -> tuple[list[list[int]], list[list[int]]]:
    """Strings, or pairs (all of one kind) -> (ids with special tokens, token types; None for strings)."""
    if not items:
        return [], []
    if isinstance(items[0], str):
        ids = tok(items, add_special_tokens=True, verbose=False, **kw)["input_ids"]
        return ids, [None] * len(ids)
    out = tok([a for a, _ in items], [b for _, b in items], add_special_tokens=True, verbose=False,
              return_token_type_ids=True, **kw)
    if "token_type_ids" not in out:
        raise ValueError("this tokenizer returns no token types, which sentence pairs need (use a BERT tokenizer)")
    return out["input_ids"], out["token_type_ids"]


def tokenize(model, texts: Sequence, truncate: bool = False, where: Callable[[int], str] = _default_where,
             pairs: bool = False) -> tuple[list[list[int]], list[int], list[list[int]] | None]:
    """texts -> (token ids with special tokens, indices of truncated texts, token types or None).

    pairs: an item may also be a (text, text_pair) pair, encoded as the tokenizer encodes sentence
    pairs ([CLS] a [SEP] b [SEP], token types 0 then 1; an empty text_pair means no pair, as in
    transformers' pipeline); types are returned only then. Raises on a
    text longer than the model's max length unless `truncate` (then it keeps the first max_length
    tokens; a pair loses tokens from its longer text first, as transformers' "longest_first")."""
    if isinstance(texts, str):
        raise TypeError("pass a list of texts, not one string")
    if len(texts) == 0:
        raise ValueError("no input texts")
    for i, t in enumerate(texts):
        if not (isinstance(t, str) or (pairs and is_pair(t))):
            what = "str or a (text, text_pair) pair of str" if pairs else "str"
            raise TypeError(f"{where(i)} is {type(t).__name__}{f' of {len(t)}' if isinstance(t, (tuple, list)) else ''}, "
                            f"not {what}")
    limit, tok = max_length(model), model.tokenizer
    texts = [t if isinstance(t, str) else t[0] if t[1] == "" else tuple(t) for t in texts]
    groups = [[i for i, t in enumerate(texts) if isinstance(t, str)], [i for i, t in enumerate(texts) if not isinstance(t, str)]]
    if groups[1] and model.config.type_vocab_size < 2:
        raise ValueError(f"{where(groups[1][0])} is a sentence pair, but this model has "
                         f"{model.config.type_vocab_size} token type(s); pairs need 2 (segment A and B)")
    ids: list = [None] * len(texts)
    types: list = [None] * len(texts)

    def encode(rows, **kw):
        got_ids, got_types = _encode(tok, [texts[i] for i in rows], **kw)
        for i, row, row_types in zip(rows, got_ids, got_types):
            ids[i], types[i] = row, row_types

    for group in groups:
        encode(group, truncation=False)
    long = [i for i, row in enumerate(ids) if len(row) > limit]
    if long and not truncate:
        i = long[0]
        raise ValueError(f"{where(i)} has {len(ids[i])} tokens, more than the model's max length {limit} "
                         f"({len(long)} text(s) too long); pass truncate=True (--truncate) to cut them")
    for group in groups:
        encode([i for i in group if len(ids[i]) > limit], truncation=True, max_length=limit)
    return ids, long, ([t if t is not None else [0] * len(r) for r, t in zip(ids, types)] if pairs else None)


def plan(lengths: Sequence[int], limit: int, batch_size: int) -> list[tuple[np.ndarray, int, int]]:
    """Batches as (row indices, padded length, padded batch size), longest first.

    Rows are taken in length order, batch_size at a time (as sentence-transformers does), and
    each batch is padded to the first length bucket that holds its longest row; only the last
    batch is short (padded up to the next batch shape).
    """
    buckets, shapes = np.asarray(length_buckets(limit)), batch_shapes(batch_size)
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out = []
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        longest = lengths[rows[0]]
        out.append((rows, int(buckets[np.searchsorted(buckets, longest)]), next(x for x in shapes if x >= len(rows))))
    return out


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Texts (indices) per packed row of `width` tokens, first-fit decreasing: each row starts with
    the longest text left and takes the longest that still fit. Every text must be <= width; a
    row holds at most width // 2 texts (the segment slots of `embed_packed`)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # ascending
    left = [lengths[i] for i in order]
    rows = []
    while order:
        row, free = [order.pop()], width - left.pop()
        while order and len(row) < width // 2:
            j = bisect.bisect_right(left, free) - 1  # the longest text that still fits
            if j < 0:
                break
            row.append(order.pop(j))
            free -= left.pop(j)
        rows.append(row)
    return rows


def pack_width(model) -> int:
    """Row width of packed embedding. XLA's attention scores every (query, key) pair of a row, so
    rows stay short (PACK_WIDTH); the CPU attention kernel scores only pairs inside a text, so a
    row can be as long as the model allows (KERNEL_PACK_WIDTH) and nearly every text packs."""
    return min(KERNEL_PACK_WIDTH if kernels.usable(model) else PACK_WIDTH, max_length(model))


def _packed_batches(model, ids: list[list[int]], texts: list[int], width: int, batch_size: int, pad: int):
    """Dispatch `embed_packed` over `texts` (indices into ids, each <= width tokens) packed several
    to a row, about batch_size * PACK_WIDTH tokens per batch; yields (rows of text indices, device
    result [B, K, D], real tokens, computed tokens). With the CPU kernels the rows left after the
    full batches go in the largest batch shapes they fill (e.g. 3 rows: three batches of 1): there
    a padding row costs as much as a real one and a call little. Elsewhere they are padded."""
    fn, shapes = programs(model)["embed_packed"], batch_shapes(max(1, batch_size * PACK_WIDTH // width))
    rows = [[texts[i] for i in row] for row in pack_rows([len(ids[t]) for t in texts], width)]
    split, s = kernels.usable(model), 0
    while s < len(rows):
        left = len(rows) - s
        batch = max(x for x in shapes if x <= left) if split else next((x for x in shapes if x >= left), shapes[-1])
        chunk, s = rows[s:s + batch], s + batch
        tokens = np.full((batch, width), pad, np.int32)
        segments = np.zeros((batch, width), np.int32)
        positions = np.zeros((batch, width), np.int32)
        for b, row in enumerate(chunk):
            at = 0
            for k, t in enumerate(row):
                n = len(ids[t])
                tokens[b, at:at + n], segments[b, at:at + n], positions[b, at:at + n] = ids[t], k + 1, np.arange(n)
                at += n
        out = fn(model.params, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions))
        yield chunk, out, int((segments > 0).sum()), tokens.size


def _bucketed_batches(model, fn, ids: list[list[int]], texts: list[int], batch_size: int, pad: int,
                      extra: list | None, types: list[list[int]] | None):
    """Dispatch `fn` over `texts` in length-sorted, bucket-padded batches (with their token types
    when given); yields (text indices, device result, real tokens, computed tokens)."""
    for rows, length, batch in plan([len(ids[i]) for i in texts], max_length(model), batch_size):
        rows = np.asarray(texts)[rows]
        tokens, mask = _pack(ids, rows, length, batch, pad)
        args = [model.params, jnp.asarray(tokens), jnp.asarray(mask)]
        if types is not None:
            args.append(jnp.asarray(_pack(types, rows, length, batch, 0)[0]))
        if extra is not None:
            at = np.zeros((batch,), np.int32)
            at[:len(rows)] = [extra[r] for r in rows]
            args.append(jnp.asarray(at))
        yield rows, fn(*args), int(mask.sum()), tokens.size


def _drain(batches, stats: EncodeStats, place) -> None:
    """Consume dispatched batches: each result is fetched (`place(owners, result)`) only after the
    next batch is dispatched, so the host packs batch i + 1 while the device runs batch i."""
    pending = None
    for owners, out, real, computed in batches:
        if pending is not None:
            place(*pending)
        pending = (owners, out)
        stats.batches += 1
        stats.tokens += real
        stats.padded_tokens += computed
    if pending is not None:
        place(*pending)


def _pack(ids: list[list[int]], rows: np.ndarray, length: int, batch: int, pad_id: int):
    tokens = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for j, r in enumerate(rows):
        tokens[j, :len(ids[r])] = ids[r]
        mask[j, :len(ids[r])] = 1
    return tokens, mask


def programs(model) -> dict:
    """The jitted per-task functions of `model` (cached on it); `._cache_size()` counts compiles."""
    fns = model.__dict__.get("_encoder_programs")
    if fns is not None:
        return fns
    # on the CPU backend (one device), attention within segments and w8a8 dots run in jaxaccel's kernels
    usable = kernels.usable(model)
    choice = KernelChoice(segment_attention=usable, int8_gemm=usable)
    module = registry.build(model.config, model.dtype, dot_general_cls=model.dot_general_cls, kernels=choice)

    def apply(params, tokens, **kw):
        return module.apply({"params": params}, tokens, **kw)

    def run(params, tokens, mask):
        return apply(params, tokens, segment_ids=mask)

    def embed(params, tokens, mask):  # mean pooling over real tokens, then L2 normalize
        h = run(params, tokens, mask).hidden.astype(jnp.float32)
        m = mask[..., None].astype(jnp.float32)
        mean = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    def fill_mask(params, tokens, mask, at):  # at [B]: the one [MASK] position scored per row
        h = run(params, tokens, mask).logits
        return jax.nn.softmax(jnp.take_along_axis(h, at[:, None, None], axis=1)[:, 0], axis=-1)

    score = {"softmax": lambda x: jax.nn.softmax(x, axis=-1), "sigmoid": jax.nn.sigmoid,
             "none": lambda x: x}[score_function(model.config)]

    def classify(params, tokens, mask, types):
        return score(apply(params, tokens, segment_ids=mask, token_types=types).logits)

    def embed_packed(params, tokens, segments, positions):
        """Rows holding several texts: segments [B, P] (0 = padding, 1..K = the row's texts), positions
        restarting at 0 per text -> [B, K, D] unit-norm embeddings, one per segment. Attention is
        block-diagonal (a text sees only itself), so each embedding is the text's own."""
        h = apply(params, tokens, positions=positions, segment_ids=segments).hidden
        onehot = (segments[..., None] == jnp.arange(1, tokens.shape[1] // 2 + 1)).astype(jnp.float32)  # [B, P, K]
        mean = jnp.einsum("bpk,bpd->bkd", onehot, h.astype(jnp.float32)) / jnp.maximum(onehot.sum(1)[..., None], 1e-9)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    fns = {"embed": jax.jit(embed), "embed_packed": jax.jit(embed_packed), "fill_mask": jax.jit(fill_mask),
           "classify": jax.jit(classify)}
    model.__dict__["_encoder_programs"] = fns
    return fns


def compiled_programs(model) -> int:
    return sum(f._cache_size() for f in programs(model).values())


def _run(model, task: str, ids: list[list[int]], batch_size: int, progress: bool, stats: EncodeStats,
         extra: list | None = None, pack: bool = False, types: list | None = None) -> list[np.ndarray]:
    """Run `task` over all rows; returns one numpy result per row, in input order. With `pack`
    (embed), texts of up to `pack_width(model)` tokens share rows; longer ones are batched as usual."""
    from tqdm.auto import tqdm

    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    results: list = [None] * len(ids)
    bar = tqdm(total=len(ids), unit="text", file=sys.stderr, disable=not progress or len(ids) < 256, leave=False)

    def place_rows(rows, out):
        out = np.asarray(out)
        for j, r in enumerate(rows):
            results[r] = out[j]
        bar.update(len(rows))

    def place_packed(rows, out):  # rows: per packed row, its texts (segment k + 1 = text k)
        out = np.asarray(out)
        for b, row in enumerate(rows):
            for k, t in enumerate(row):
                results[t] = out[b, k]
        bar.update(sum(map(len, rows)))

    rest = list(range(len(ids)))
    if pack:
        width = pack_width(model)
        _drain(_packed_batches(model, ids, [i for i in rest if len(ids[i]) <= width], width, batch_size, pad),
               stats, place_packed)
        rest = [i for i in rest if len(ids[i]) > width]
    _drain(_bucketed_batches(model, programs(model)[task], ids, rest, batch_size, pad, extra, types), stats,
           place_rows)
    bar.close()
    return results


def embed(model, texts: Sequence[str], *, truncate: bool = False, batch_size: int = DEFAULT_BATCH,
          progress: bool = False, stats: EncodeStats | None = None, where=_default_where,
          pack: bool = True) -> np.ndarray:
    """texts -> float32 [N, D] unit-norm sentence embeddings (mean pooling, as sentence-transformers).

    pack: texts of up to `pack_width(model)` tokens share rows (block-diagonal attention, positions from 0
    per text), so almost no compute goes to padding; pack=False pads each text to its batch's
    length bucket."""
    _check_encoder(model)
    stats = stats if stats is not None else EncodeStats()
    ids = _tokenize_into(stats, model, texts, truncate, where)
    return np.stack(_run(model, "embed", ids, batch_size, progress, stats, pack=pack)).astype(np.float32)


def fill_mask(model, texts: Sequence[str], *, top_k: int = 5, truncate: bool = False,
              batch_size: int = DEFAULT_BATCH, progress: bool = False, stats: EncodeStats | None = None,
              where=_default_where) -> list[list[list[tuple[str, float]]]]:
    """texts -> per text, per [MASK] (left to right), the top_k (token, probability) pairs."""
    _check_encoder(model, "masked_lm")
    tok = model.tokenizer
    if tok.mask_token is None:
        raise ValueError("this tokenizer has no mask token; fill-mask needs one")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    for i, t in enumerate(texts if not isinstance(texts, str) else []):
        if isinstance(t, str) and tok.mask_token not in t:
            raise ValueError(f"{where(i)} has no {tok.mask_token} token to fill: {t[:80]!r}")
    stats = stats if stats is not None else EncodeStats()
    ids = _tokenize_into(stats, model, texts, truncate, where)
    # one row per (text, mask) pair: a row scores one position, so programs stay [B, V]
    owners, at = [], []
    for i, row in enumerate(ids):
        pos = [p for p, t in enumerate(row) if t == tok.mask_token_id]
        if not pos:
            raise ValueError(f"{where(i)}: its {tok.mask_token} token was cut off by truncation")
        owners += [i] * len(pos)
        at += pos
    probs = _run(model, "fill_mask", [ids[i] for i in owners], batch_size, progress, stats, at)
    out: list = [[] for _ in ids]
    for i, p in zip(owners, probs):
        top = np.argsort(-p, kind="stable")[:top_k]
        out[i].append([(tok.decode([int(t)]).strip(), float(p[t])) for t in top])
    return out


def score_function(cfg) -> str:
    """How `classify` turns a classifier's logits into scores, as transformers' text-classification
    pipeline does: "none" (the raw value) for regression; "sigmoid" per label for multi-label
    checkpoints and for one-label ones (e.g. cross-encoder rerankers); "softmax" over classes otherwise."""
    if cfg.problem_type == "regression":
        return "none"
    if cfg.problem_type == "multi_label_classification" or len(cfg.labels) == 1:
        return "sigmoid"
    return "softmax"


def classify(model, texts: Sequence, *, truncate: bool = False, batch_size: int = DEFAULT_BATCH,
             progress: bool = False, stats: EncodeStats | None = None, where=_default_where,
             all_scores: bool = False) -> list:
    """texts -> per text (label, score) of the top class (or all classes, best first).

    A text may be a (text, text_pair) pair (NLI, cross-encoder reranking), encoded as the tokenizer
    encodes sentence pairs, with token types. The score is the class probability (softmax); per label
    sigmoid for multi-label and one-label checkpoints; the raw value for regression (`score_function`)."""
    _check_encoder(model, "classifier")
    labels = model.config.labels
    if labels == tuple(f"LABEL_{i}" for i in range(len(labels))):
        warnings.warn("this classification checkpoint has no label names (config.json id2label); "
                      f"using LABEL_0..LABEL_{len(labels) - 1}", stacklevel=2)
    stats = stats if stats is not None else EncodeStats()
    ids, types = _tokenize_into(stats, model, texts, truncate, where, pairs=True)
    out = []
    for p in _run(model, "classify", ids, batch_size, progress, stats, types=types):
        ranked = [(labels[c], float(p[c])) for c in np.argsort(-p, kind="stable")]
        out.append(ranked if all_scores else ranked[0])
    return out
