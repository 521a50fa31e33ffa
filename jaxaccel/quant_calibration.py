"""Calibration for int4: how much each input of each Dense matters, measured on text.

A plain scale search spends int4's 16 levels to make every weight of a group equally exact. But
an error on a weight whose input is usually near zero costs the output nothing, while one on an
input that is often large costs a lot. So `Model.quantize` runs the float model on calibration
text first and records, for every Dense, the mean square of each of its inputs over all tokens.
The int4 search (quant_math.quantize_asymmetric_mse) then minimises the weighted error
sum_i importance_i (w_i - q_i s - z)^2. With importance = the mean square, that is the expected
squared error of the output for inputs of those sizes (the idea of llama.cpp's importance
matrix); we use the mean square to the power POWER. The default text is
jaxaccel/eval_data/calibration.txt, written for this and kept apart from every text we score
quality on (bench/data/corpus.txt, eval_data/heldout.txt).
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import quant
from .layers import Dense, Embed

CALIBRATION_TEXT = Path(__file__).with_name("eval_data") / "calibration.txt"
WINDOW = 512  # tokens per calibration row (at most the model's positions)
# importance = (mean square) ** POWER: 1 is the expected output error exactly, but it trusts a
# few thousand calibration tokens fully; 0.75 leans back toward the unweighted search (0) and
# kept float32's greedy text longer on 32 prompts at the same top-1 (docs/quantization.md)
POWER = 0.75


def importance_for(model, cfg, calibration) -> dict | None:
    """What `Model.quantize(cfg, calibration)` weighs its int4 searches by (`input_importance`):
    None when `cfg` stores no weight as int4 (or the model is already quantized: quant refuses
    it), or there is nothing to calibrate on (`calibration_rows`)."""
    if model.quant is not None or not isinstance(cfg, quant.QuantConfig) or not quant.int4_paths(model.params, cfg):
        return None
    rows = calibration_rows(model, calibration)
    return None if rows is None else input_importance(model, rows)


def calibration_rows(model, calibration) -> np.ndarray | None:
    """`calibration` (None: the shipped text; a str: that text; token ids [rows, T]; False: none)
    -> int32 [rows, T] token ids, or None when there is nothing to calibrate on (False, or None
    for a model without a tokenizer: random-weight test models)."""
    if calibration is False:
        return None
    if calibration is None or isinstance(calibration, str):
        if model.tokenizer is None:
            if calibration is None:
                return None
            raise ValueError("calibration text needs a model with a tokenizer; pass token ids [rows, T] instead")
        text = CALIBRATION_TEXT.read_text(encoding="utf-8") if calibration is None else calibration
        # line by line: one long encode makes some tokenizers warn about their length limit
        ids = [i for line in text.splitlines(keepends=True) for i in model.tokenizer.encode(line, add_special_tokens=False)]
        return _windows(model, ids)
    rows = np.asarray(calibration)
    if rows.ndim != 2 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"calibration must be text, token ids [rows, T] or False; got an array of shape "
                         f"{rows.shape} and dtype {rows.dtype}")
    return model.check_tokens(rows)


def _windows(model, ids: list[int]) -> np.ndarray:
    """Token ids -> rows of the same length (BOS first where the tokenizer has one); a tail shorter
    than a full row is dropped when there is a full row (one program shape)."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    prefix = [] if bos is None else [bos]
    body = min(WINDOW, model.config.max_position_embeddings) - len(prefix)
    if not ids:
        raise ValueError("the calibration text has no tokens")
    n = max(1, len(ids) // body)
    rows = [prefix + ids[i * body:(i + 1) * body] for i in range(n)]
    return np.asarray(rows, np.int32)


def input_importance(model, rows: np.ndarray, power: float = POWER) -> dict[str, jax.Array]:
    """The float model on `rows` -> {"<Dense path>/kernel": float32 [in]} (and, for a tied
    embedding, {"<Embed path>/embedding": float32 [D]}: the lm_head's inputs): each input's mean
    square over all tokens to the power `power`, scaled to mean 1 per weight (only the ratios
    matter)."""

    def record(next_fun, args, kwargs, context):
        # recorded under the name of the weight they weigh: a Dense's inputs, and the tied
        # embedding's as the lm_head (Embed.attend: its [V, D] rows are the lm_head's outputs, so
        # the embedding's groups run over the same D inputs)
        weight = ("kernel" if isinstance(context.module, Dense) and context.method_name == "__call__" else
                  "embedding" if isinstance(context.module, Embed) and context.method_name == "attend" else None)
        if weight:
            x = args[0].astype(jnp.float32)
            context.module.sow("calibration", weight, jnp.sum(jnp.square(x).reshape(-1, x.shape[-1]), axis=0))
        return next_fun(*args, **kwargs)

    @jax.jit
    def sums(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        with nn.intercept_methods(record):
            _, state = model.module.apply({"params": params}, tokens, positions, mutable=["calibration"])
        return {path: sum(v) for path, v in traverse_util.flatten_dict(state["calibration"], sep="/").items()}

    from tqdm.auto import tqdm

    total = None
    for row in tqdm(rows, desc="calibrate int4", unit="row", leave=False):
        s = sums(model.params, jnp.asarray(row[None]))
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    out = {}
    for path, s in total.items():
        s = np.asarray(s, np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"the calibration forward gave non-finite activations at {path}: the float model "
                             "itself overflows on this text; quantize with calibration=False")
        s = s ** power
        mean = s.mean()
        out[path] = jnp.asarray(s / mean if mean > 0 else np.ones_like(s), jnp.float32)
    return out
