"""Quantization: one `QuantConfig` -> one `dot_general` factory; AQT's TRAIN -> CONVERT -> SERVE.

Modes (backend in brackets; the README has the same table):
  float32 / bfloat16 / float16  params stored and computed in that dtype; norms, softmax and
                                logits stay float32 (layers.py) [plain XLA, no factory]
  int8   weight-only, one scale per output channel (MSE-searched)             [our jnp ops]
  int4   weight-only, scale + zero per `group_size` inputs (MSE-searched, weighted by calibration:
         quant_calibration.py), 2 a byte [our jnp ops]
  w8a8   int8 weights x dynamic per-token int8 activations, int32 dot         [AQT aqt.jax.v2]
  qat    training: the w8a8 forward on float weights, straight-through gradients; serves as w8a8
  gguf   a GGUF file's quantized weights as stored, in llama.cpp's block layouts (only made by
         `jaxaccel.load(path, gguf_weights="as_stored")`; `gguf_types` names each weight's type) [quant_ggml.py]
`kv_cache_int8` stores the KV cache as int8 with one scale per (token, kv head) [our ops].
The token embedding / lm_head is int8 with one scale per 32 inputs in every integer mode.

Every quantized weight is served as [out, in] values + float32 scales [out, groups]: Dense
kernels are transposed, the (tied) embedding [V, D] already is; `Embed` gathers its rows,
`attend` contracts its last axis. No float copy of a quantized weight is kept.

TRAIN -> CONVERT -> SERVE (also the fine-tuning recipe for train.py):

    qcfg = QuantConfig(mode="qat")
    module = registry.build(config, "float32", dot_general_cls=quant.dot_general_cls(qcfg))
    loss = lambda p: xent(module.apply({"params": p}, tokens).logits, targets)
    grads = jax.jit(jax.grad(loss))(float_params)  # straight-through: d fake_quant(w) / dw = 1
    served = Model(config, float_params).quantize(qcfg)  # = quant.convert: int8 values + scales

In training mode each weight is quantized in the graph exactly as `convert` does it and run
through the serving code, so `served.logits(tokens)` equals the training forward bit for bit
(WYTIWYS, tests/test_quant.py), for qat, int8 and int4 alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util
from jax import lax

from . import kernels
from .kernels import XLA, KernelChoice
from .kernels import ggml
from .kernels import w8a8 as w8a8_kernel
from .quant_math import dequantize, pack_int4, quantize, quantize_asymmetric_mse, quantize_mse, unpack_int4
from . import quant_ggml

FLOAT_MODES = ("float32", "bfloat16", "float16")
MODES = FLOAT_MODES + ("int8", "int4", "w8a8", "qat", "gguf")
RULE_MODES = ("float", "int8", "int4", "w8a8", "qat")
EMBEDDING = r"(^|/)(embed_tokens|word_embeddings|lm_head)/"


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize a model; backend-neutral (see the module docstring for the backends).

    mode: one of MODES. group_size: inputs sharing one int4 scale (must divide every int4
    weight's input dim). int8_group_size: the same for int8 weights (None: one scale per
    output channel). quantize_embedding: also quantize the token embedding / lm_head (in Gemma 3
    270M the tied embedding is most of the params); in every integer mode it is stored int8 with
    `embedding_group_size` inputs per scale and served weight-only (int4 there, or one scale per
    row, loses visibly more quality: `bench/quant_quality.py`, docs/quantization.md).
    int4_keeps_int8: in int4 mode, the projections of these names stay int8 (as llama.cpp's
    Q4_K_M gives attn_v and ffn_down more bits: 4 bits there is what breaks greedy text most;
    () keeps every weight int4). kv_cache_int8: int8 KV cache. rules: ((regex on the
    "/"-joined param path, mode or "float"), ...): first match wins, e.g.
    (("layers_0/mlp/down_proj", "float"),) keeps one sensitive layer in float.
    gguf_types: mode "gguf" only: ((param path, ggml type), ...), the weights held as a GGUF
    file's blocks (quant_ggml.TYPES); every other weight is float.
    The int4 defaults (groups of 32, v_proj / down_proj int8) keep the embedded Gemma 3 270M's
    greedy text sensible where groups of 128 everywhere did not (`bench/quant_quality.py`).
    """

    mode: str = "int8"
    group_size: int = 32
    int8_group_size: int | None = None
    embedding_group_size: int | None = 32
    quantize_embedding: bool = True
    int4_keeps_int8: tuple[str, ...] = ("v_proj", "down_proj")
    kv_cache_int8: bool = False
    rules: tuple[tuple[str, str], ...] = ()
    gguf_types: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        types = tuple(tuple(t) for t in self.gguf_types)
        if any(len(t) != 2 or t[1] not in quant_ggml.TYPES for t in types) or (types and self.mode != "gguf"):
            raise ValueError(f"gguf_types must be (param path, ggml type) pairs with a type of "
                             f"{', '.join(quant_ggml.TYPES)}, in mode 'gguf' only; got {self.gguf_types!r}")
        object.__setattr__(self, "gguf_types", types)
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even integer (e.g. 32, 64, 128), got {self.group_size!r}")
        for name in ("int8_group_size", "embedding_group_size"):
            g = getattr(self, name)
            if g is not None and (not isinstance(g, int) or g < 1):
                raise ValueError(f"{name} must be a positive integer or None (one scale per row), got {g!r}")
        rules = tuple(tuple(r) for r in self.rules)
        for rule in rules:
            if len(rule) != 2 or rule[1] not in RULE_MODES:
                raise ValueError(f"quantization rule {rule!r} must be (regex, mode) with mode one of {RULE_MODES}")
            try:
                re.compile(rule[0])
            except re.error as e:
                raise ValueError(f"quantization rule {rule!r}: bad regex ({e})") from None
        object.__setattr__(self, "rules", rules)
        keep = tuple(self.int4_keeps_int8)
        if not all(isinstance(n, str) and re.fullmatch(r"\w+", n) for n in keep):
            raise ValueError(f"int4_keeps_int8 must be projection names such as 'v_proj', got {self.int4_keeps_int8!r}")
        object.__setattr__(self, "int4_keeps_int8", keep)

    @property
    def dtype(self) -> str:
        """The params / compute dtype of the float part of the model."""
        return self.mode if self.mode in FLOAT_MODES else "float32"

    @property
    def integer(self) -> bool:
        return self.mode not in FLOAT_MODES

    def plan(self, path: str) -> tuple[str, int | None]:
        """(storage, group) of the weight at `path` ("layers_0/mlp/up_proj/kernel"): storage is
        "float", "int8", "int4" or "w8a8" (qat trains what w8a8 serves); group is the inputs per
        scale (None: one per output channel)."""
        if self.mode == "gguf":  # the ggml type the file stores this weight in, or float
            return dict(self.gguf_types).get(path, "float"), None
        if not self.integer or not quantizable(path):
            return "float", None
        embedding = bool(re.search(EMBEDDING, path))
        mode = next((m for pattern, m in self.rules if re.search(pattern, path)), None)
        if mode is None:
            mode = ("int8" if self.quantize_embedding else "float") if embedding else self.mode
            if mode == "int4" and any(f"/{name}/" in f"/{path}" for name in self.int4_keeps_int8):
                mode = "int8"
        mode = "w8a8" if mode == "qat" else mode
        if mode == "int8":
            return mode, self.embedding_group_size if embedding else self.int8_group_size
        return mode, self.group_size if mode == "int4" else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        d = json.loads(text)
        # folders written before int4_keeps_int8 existed hold every int4 weight as int4
        return cls(**{"int4_keeps_int8": (), **d, "rules": tuple(tuple(r) for r in d.get("rules", ())),
                      "gguf_types": tuple(tuple(t) for t in d.get("gguf_types", ()))})


def int4_paths(params, cfg: QuantConfig) -> list[str]:
    """The "/"-joined paths of the weights `cfg` stores as int4 (those calibration weighs)."""
    return [p for p in traverse_util.flatten_dict(params, sep="/") if cfg.plan(p)[0] == "int4"]


def quantizable(path: str) -> bool:
    """Matmul weights: Dense kernels and the token embedding (position embeddings are not)."""
    return path.endswith("/kernel") or path == "kernel" or bool(
        re.search(r"(^|/)(embed_tokens|word_embeddings)/embedding$", path))


# --- numerics (our own: int8 / int4 weight-only) ----------------------------------------------
def _stored(mode: str, w: jax.Array, group: int | None, importance: jax.Array | None = None):
    """Float [out, in] -> (stored values, float32 scale [out, G], zero [out, G] or None) of `mode`:
    int4 asymmetric (scale + zero, MSE-searched, weighted by the inputs' `importance` when given)
    and packed, int8 symmetric MSE-searched, w8a8 symmetric min/max (AQT's per-channel weight scale)."""
    if mode == "int4":
        q, s, z = quantize_asymmetric_mse(w, 4, group, importance=importance)
        return pack_int4(q), s, z
    if mode == "int8":
        return (*quantize_mse(w, 8, group), None)
    return (*quantize(w, 8, group), None)


def _values(mode: str, stored: jax.Array) -> jax.Array:
    return unpack_int4(stored) if mode == "int4" else stored


# --- AQT (w8a8 / qat) --------------------------------------------------------------------------
def _aqt_config():
    """int8 x int8 forward (per-token activations, per-channel weights), float backward (STE).
    Built per call: AQT configs hold per-call calibration state."""
    from aqt.jax.v2 import config as aqt_config

    return aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)


def _aqt_dot(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., in] . frozen int8 weight q [out, in] (scale [out, 1]) -> [..., out]: AQT's SERVE
    dot (dynamic per-token int8 activations, int32 accumulation)."""
    from aqt.jax.v2 import aqt_tensor

    dims = (((x.ndim - 1,), (1,)), ((), ()))
    frozen = aqt_tensor.QTensor(qvalue=q, scale=[scale.astype(x.dtype)], scale_t=None, bias=[],
                                dequant_dtype=x.dtype)
    return _aqt_config().dg_core(x, jnp.zeros(q.shape, x.dtype), None, frozen, dims)[0]  # zeros: dead code


# --- the factory ---------------------------------------------------------------------------
@dataclass
class Weight:
    """One matmul weight as `Dense` / `Embed` use it, viewed as [out, in].

    Serving: `stored` = (values int8 [out, in] or packed uint8 [out, in / 2], scale [out, G],
    zero [out, G] or None). Training (`stored` None): `value` is the float weight; mode "float"
    multiplies it as is, otherwise it is quantized in the graph and run through the *serving*
    code with straight-through gradients (`_ste`), so QAT and SERVE compute the same thing.
    """

    mode: str
    value: jax.Array | None
    stored: tuple | None
    group: int | None
    kernels: KernelChoice = XLA  # the module's: decode programs on CPU read int8 through the kernel

    def _frozen(self, w):
        """Float w [out, in] -> `stored` as convert makes it (the optimization barrier keeps XLA
        from folding the quantization into what follows; see `quantize`)."""
        return lax.optimization_barrier(_stored(self.mode, lax.stop_gradient(w), self.group))

    def dot(self, x: jax.Array, preferred_element_type=None) -> jax.Array:
        """x [..., in] -> [..., out]."""
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        exact = lambda x, w: lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=preferred_element_type)
        if self.mode == "float":
            return exact(x, self.value)
        serve = lambda x, stored: _serve_dot(self.mode, x, stored, preferred_element_type, self.kernels)
        if self.stored is not None:
            return serve(x, self.stored)
        return _ste(lambda x, w: serve(x, self._frozen(w)), exact)(x, self.value)

    def take(self, ids: jax.Array) -> jax.Array:
        """Rows `ids` [...] -> [..., in] (embedding lookup)."""
        exact = lambda w, ids: jnp.take(w, ids, axis=0)
        if self.mode == "float":
            return exact(self.value, ids)
        if self.stored is not None:
            return _serve_rows(self.mode, self.stored, ids)
        return _ste(lambda w, ids: _serve_rows(self.mode, self._frozen(w), ids), exact)(self.value, ids)


def dot_many(x: jax.Array, weights) -> list[jax.Array] | None:
    """x [..., in] times several `Weight`s sharing that input (`layers.project`) in one kernel call,
    in a decode program, when each is served from int8 values with scales and no zero
    (`kernels.dot_many`), or each from a GGUF file's blocks (`kernels.ggml.dot_many`, types may
    differ); else None: the caller multiplies them one at a time."""
    if not all(isinstance(w, Weight) and w.stored is not None and w.kernels.decode for w in weights):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if all(w.mode == "int8" and w.stored[2] is None for w in weights):
        ys = kernels.dot_many(x2, [w.stored[:2] for w in weights], x.dtype)
    elif all(w.mode in quant_ggml.TYPES for w in weights):
        ys = ggml.dot_many(x2, [(w.stored[0], w.mode) for w in weights], x.dtype)
    else:
        return None
    return None if ys is None else [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def _ste(serve, exact):
    """serve(*args) in the forward pass, the gradient of exact(*args) in the backward pass."""
    f = jax.custom_vjp(serve)
    f.defvjp(lambda *args: (serve(*args), args), lambda args, ct: jax.vjp(exact, *args)[1](ct))
    return f


def _serve_dot(mode, x, stored, preferred_element_type=None, choice: KernelChoice = XLA):
    """x [..., in] . stored weight [out, in] -> [..., out]."""
    if mode in quant_ggml.TYPES:  # a GGUF file's blocks as stored (no scales: they are in the blocks)
        return quant_ggml.serve_dot(mode, x, stored[0], preferred_element_type, choice)
    q, scale, zero = stored
    if mode == "w8a8":  # encoder programs on CPU: the int8 GEMM kernel, with AQT's numerics
        y = w8a8_kernel.dot(x, q, scale) if choice.int8_gemm else None
        return _aqt_dot(x, q, scale) if y is None else y
    if choice.decode and mode in ("int8", "int4"):  # decode programs on CPU: the weight read as stored
        x2, out = x.reshape(-1, x.shape[-1]), preferred_element_type or x.dtype
        y = (kernels.dot(x2, q, 1, out, scale) if mode == "int8" and zero is None
             else kernels.dot_int4(x2, q, scale, zero, out) if mode == "int4" else None)
        if y is not None:
            return y.reshape(*x.shape[:-1], y.shape[-1])
    # Dequantize, then a dot against the transposed [in, out] view: XLA fuses the conversion into
    # the dot's operand and on CPU this ties float32 at batch 1 (bench/quant_speed.py measures the
    # alternatives, contracting the last axis of [out, in] or multiply + reduce: both slower).
    w = dequantize(_values(mode, q), scale, zero, x.dtype)
    return lax.dot_general(x, w.T, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=preferred_element_type)


def _serve_rows(mode, stored, ids):
    """Rows `ids` of a stored [out, in] weight -> float32 [..., in]."""
    if mode in quant_ggml.TYPES:
        return quant_ggml.serve_rows(mode, stored[0], ids)
    rows = lambda a: None if a is None else jnp.take(a, ids, axis=0).reshape(ids.size, -1)
    q, scale, zero = map(rows, stored)
    return dequantize(_values(mode, q), scale, zero).reshape(*ids.shape, -1)


class QuantDot:
    """What `dot_general_cls()` returns under quantization: `layers.Dense` / `Embed` ask it for
    their weight (`weight`) and multiply through the returned `Weight`."""

    def __init__(self, cfg: QuantConfig, serving: bool):
        self.cfg, self.serving = cfg, serving

    def weight(self, module, name: str, init, shape: tuple[int, int], axes: tuple, transposed: bool) -> Weight:
        """The weight `name` of `module` ([in, out] when `transposed`, else [out, in]); creates
        the float param, or, when serving a quantized mode, the int values + scales instead."""
        path = "/".join((*module.scope.path, name))
        mode, group = self.cfg.plan(path)
        if not self.serving or mode == "float":
            w = module.param(name, init, shape, module.param_dtype)
            return Weight(mode, w.T if transposed else w, None, group, module.kernels)
        out_axis, in_axis = axes[::-1] if transposed else axes
        out, n = shape[::-1] if transposed else shape
        if group and n % group:
            raise ValueError(f"{mode} group size {group} does not divide the input dim {n} of {path}")
        packed, dtype = (2, jnp.uint8) if mode == "int4" else (1, jnp.int8)
        groups = n // group if group else 1
        param = lambda suffix, axes, shape, dtype: module.param(
            f"{name}_{suffix}", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, dtype)
        if mode in quant_ggml.TYPES:  # uint8 [out, bytes per row], as the GGUF file stores it
            q = param("q", (out_axis, None), quant_ggml.ggml.byte_shape(mode, out, n), jnp.uint8)
            return Weight(mode, None, (q, None, None), None, module.kernels)
        stored = (param("q", (out_axis, in_axis), (out, n // packed), dtype),
                  param("scale", (out_axis, None), (out, groups), jnp.float32),
                  param("zero", (out_axis, None), (out, groups), jnp.float32) if mode == "int4" else None)
        return Weight(mode, None, stored, group, module.kernels)


def dot_general_cls(cfg: QuantConfig, serving: bool = False):
    """The factory `layers.py` takes (`registry.build(..., dot_general_cls=...)`): `serving=False`
    trains / fake-quantizes float params; `serving=True` reads `convert`'s int values + scales.
    None for float modes (plain XLA dots in the model's dtype)."""
    if not cfg.integer:
        return None
    return functools.partial(QuantDot, cfg, serving)


def is_quantized(params) -> bool:
    return any(str(k[-1]).endswith(("_q", "_scale", "_zero")) for k in traverse_util.flatten_dict(params))


def convert(params, cfg: QuantConfig, progress: bool = False, importance: dict | None = None):
    """CONVERT: a float param tree -> the serving tree of `cfg`: each quantized weight "w" becomes
    "w_q" (int8 [out, in], or uint8 [out, in / 2] for int4) + "w_scale" (float32 [out, G]) (+
    "w_zero" for int4; int8 / int4 scales are searched for the smallest squared error, see
    `quantize_mse`); no float copy is kept. Float modes cast every leaf to that dtype.
    importance: {weight path: float32 [in]} (quant_calibration.input_importance): int4 weights
    found there minimise the error weighted by their inputs' mean squares instead."""
    if cfg.mode == "gguf":
        raise ValueError("mode 'gguf' holds a GGUF file's weights as its blocks store them: load the file with "
                         "jaxaccel.load(path, gguf_weights='as_stored'); float params cannot be converted to it")
    if is_quantized(params):
        raise ValueError("these params are already quantized (they hold *_q / *_scale tensors); "
                         "convert the float params (load the original checkpoint) instead")
    if not cfg.integer:
        return jax.tree.map(lambda x: x.astype(cfg.dtype), params)
    from tqdm.auto import tqdm

    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, w in tqdm(flat.items(), desc=f"quantize {cfg.mode}", disable=not progress, leave=False):
        mode, group = cfg.plan(path)
        if mode == "float":
            out[path] = w
            continue
        w = w.T if path.endswith("kernel") else w  # [out, in]
        if group and w.shape[1] % group:
            raise ValueError(f"{mode} group size {group} does not divide the input dim {w.shape[1]} of {path} "
                             f"([out, in] = {list(w.shape)}); pick a group size that divides it, or a rule "
                             "keeping this weight in another mode")
        q, scale, zero = _stored_jit(mode, w, group, (importance or {}).get(path) if mode == "int4" else None)
        out[f"{path}_q"], out[f"{path}_scale"] = q, scale
        if zero is not None:
            out[f"{path}_zero"] = zero
    return traverse_util.unflatten_dict(out, sep="/")


_stored_jit = jax.jit(_stored, static_argnums=(0, 2))


def quantize_model(model, cfg: QuantConfig, importance: dict | None = None):
    """`Model.quantize`: a new Model whose params are `convert`ed (with `importance`, see
    `convert`) and whose matmuls serve `cfg`."""
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"quantize() takes a jaxaccel.QuantConfig, got {type(cfg).__name__}")
    if model.quant is not None:
        raise ValueError(f"this model is already quantized ({model.quant.mode}); quantize the float model "
                         "(jaxaccel.load the original checkpoint) instead")
    params = convert(model.params, cfg, progress=True, importance=importance)
    dtype = cfg.dtype if not cfg.integer else model.dtype
    return dataclasses.replace(model, params=params, dtype=dtype, quant=cfg,
                               dot_general_cls=dot_general_cls(cfg, serving=True))


def memory_report(model, group_size: int = QuantConfig.group_size) -> tuple[list[str], list[list[str]]]:
    """Params bytes per mode, measured on the arrays each quantized model really holds ->
    (header, rows) for a table."""
    base = model.params_bytes
    rows = []
    for mode, emb in [("float32", True), ("bfloat16", True), ("float16", True), ("int8", True), ("int8", False),
                      ("int4", True), ("int4", False), ("w8a8", True)]:
        cfg = QuantConfig(mode=mode, group_size=group_size, quantize_embedding=emb)
        n = base if mode == "float32" else model.quantize(cfg).params_bytes
        label = mode + (f" g={group_size}" if mode == "int4" else "")
        rows.append([label, "yes" if cfg.integer and emb else ("n/a" if not cfg.integer else "no"),
                     f"{n / 2**20:.1f}", f"{n / base:.3f}"])
    return ["mode", "embedding quantized", "params MiB", "vs float32"], rows
