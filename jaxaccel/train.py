"""Training math with optax on the inference graph: losses, the train step, optimizers, FLOPs.
Pure functions of (state, batch); the loop that runs them (data, checkpoints, metrics, resume)
is finetuning.py.

The step differentiates the same `model.module.apply` (cache=None) that inference runs.
`make_train_step(...)` returns a jitted pure `(state, batch) -> (state, metrics)` that
donates the state and pins no device placement: pass sharded state and batches and jit
propagates their shardings. Batches are dicts of int32 arrays (see `data.Dataset`):
tokens / positions / segments (0 = padding; equal ids attend) / weights (1 = loss target)
[B, T] and labels [B].

Losses: "sft" causal LM (targets are the tokens with weight 1, so prompts are masked),
"classify" cross-entropy over the classifier head, "mlm" BERT masking (15 %: 80 / 10 / 10).
Sums of per-token losses and counts are accumulated over micro-batches, so gradient
accumulation gives exactly the full-batch mean.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from . import data as data_lib
from . import lora as lora_lib
from .models import registry

OPTIMIZERS = ("adamw", "sgd", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant")


@flax.struct.dataclass
class TrainState:
    """params: trainable pytree (the LoRA adapters under LoRA); opt_state: optax state of params;
    step, data_pos: int32 scalars (batches consumed); rng: PRNG key (per-step keys are
    fold_in(rng, step)); frozen: base params under LoRA (never updated), else None."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    data_pos: jax.Array
    frozen: Any = None


def make_schedule(lr: float, steps: int, schedule: str = "cosine", warmup: int = 0):
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    decay = max(steps - warmup, 1)
    after = {"cosine": optax.cosine_decay_schedule(lr, decay),
             "linear": optax.linear_schedule(lr, 0.0, decay),
             "constant": optax.constant_schedule(lr)}[schedule]
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(name: str = "adamw", lr=1e-4, *, steps: int = 1000, schedule: str = "cosine", warmup: int = 0,
                   weight_decay: float = 0.0, momentum: float = 0.9, clip: float | None = 1.0):
    """optax optimizer: global-norm clipping (clip=None: off) then adamw | sgd (momentum) |
    adafactor | lion, with lr a float or the warmup + cosine/linear/constant schedule.
    Weight decay skips vectors (norms, biases)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    rate = make_schedule(lr, steps, schedule, warmup) if isinstance(lr, (int, float)) else lr
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
    opt = {"adamw": lambda: optax.adamw(rate, weight_decay=weight_decay, mask=decay_mask),
           "sgd": lambda: optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                                      optax.sgd(rate, momentum=momentum or None)),
           "adafactor": lambda: optax.adafactor(rate, weight_decay_rate=weight_decay or None,
                                                weight_decay_mask=decay_mask),
           "lion": lambda: optax.lion(rate, weight_decay=weight_decay, mask=decay_mask)}[name]()
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


def init_state(model, optimizer, seed: int = 0, lora: lora_lib.LoraConfig | None = None) -> TrainState:
    """Fresh state. Params are copied: the step donates the state, `model.params` stays valid."""
    def fresh(base):  # one jitted program instead of many small eager ones
        params = jax.tree.map(jnp.copy, base) if lora is None else lora_lib.init(base, lora, seed)
        return params, optimizer.init(params)

    params, opt_state = jax.jit(fresh)(model.params)
    frozen = None if lora is None else model.params
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(seed), data_pos=jnp.zeros((), jnp.int32), frozen=frozen)


# --- losses -----------------------------------------------------------------------------------
def _mlm_inputs(batch, rng, mask_id: int, vocab: int):
    """BERT masking: 15 % of real tokens (weight 1) are targets; of those 80 % -> [MASK],
    10 % -> a random token, 10 % kept."""
    k1, k2, k3 = jax.random.split(rng, 3)
    tokens = batch["tokens"]
    chosen = jax.random.bernoulli(k1, 0.15, tokens.shape) & (batch["weights"] > 0) & (batch["segments"] > 0)
    r = jax.random.uniform(k2, tokens.shape)
    inputs = jnp.where(chosen & (r < 0.8), mask_id, tokens)
    inputs = jnp.where(chosen & (r >= 0.8) & (r < 0.9), jax.random.randint(k3, tokens.shape, 0, vocab), inputs)
    return inputs, tokens, chosen.astype(jnp.float32)


def loss_sums(logits_fn, batch, task: str, rng, mask_id: int | None = None, vocab: int = 0):
    """(sum of per-target losses, number of targets) of one micro-batch; logits_fn(tokens)
    runs the model on the batch's positions and segments."""
    if task == "sft":
        logits = logits_fn(batch["tokens"])[:, :-1]  # [B, T-1, V] predicting tokens 1..T-1
        seg = batch["segments"]
        w = (batch["weights"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        targets, w = batch["tokens"][:, 1:], w.astype(jnp.float32)
    elif task == "classify":
        logits, targets = logits_fn(batch["tokens"]), batch["labels"]
        w = (targets >= 0).astype(jnp.float32)
    elif task == "mlm":
        inputs, targets, w = _mlm_inputs(batch, rng, mask_id, vocab)
        logits = logits_fn(inputs)
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(data_lib.TASKS)}")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(targets, 0))
    return jnp.sum(ce * w), jnp.sum(w)


def train_module(model, compute_dtype=None, dot_general_cls=None):
    """model.module, or the same family module computing in `compute_dtype` on params kept in
    the model's dtype (mixed precision: bf16 compute, float32 master weights)."""
    dg = dot_general_cls or model.dot_general_cls
    if (compute_dtype is None or compute_dtype == model.dtype) and dg is model.dot_general_cls:
        return model.module
    return registry.build(model.config, compute_dtype or model.dtype, param_dtype=model.dtype, dot_general_cls=dg)


def make_loss_fn(model, task: str, *, compute_dtype=None, lora: lora_lib.LoraConfig | None = None,
                 mask_token_id: int | None = None, dot_general_cls=None):
    """(params, frozen, batch, rng, train) -> (loss sum, target count)."""
    module = train_module(model, compute_dtype, dot_general_cls)
    if task == "mlm" and mask_token_id is None:
        raise ValueError("task 'mlm' needs the tokenizer's mask token id (a BERT tokenizer with [MASK])")

    def fn(params, frozen, batch, rng, train=True):
        kw = dict(segment_ids=batch["segments"])  # packed rows: equal ids attend, 0 = padding (BERT too)

        def logits_fn(tokens):
            if lora is None:
                out = module.apply({"params": params}, tokens, batch["positions"], **kw)
            else:
                out = lora_lib.apply(module, frozen, params, lora, tokens, batch["positions"],
                                     rng=jax.random.fold_in(rng, 1) if train else None, **kw)
            return out.logits

        return loss_sums(logits_fn, batch, task, jax.random.fold_in(rng, 0), mask_token_id, model.config.vocab_size)

    return fn


def make_train_step(model, optimizer, task: str = "sft", *, accum: int = 1, schedule=None, compute_dtype=None,
                    lora: lora_lib.LoraConfig | None = None, mask_token_id: int | None = None,
                    dot_general_cls=None):
    """Jitted `(state, batch) -> (state, metrics)`; donates the state.

    accum > 1 splits the batch into `accum` micro-batches (batch size divisible by accum),
    summing losses and gradients before one optimizer update. metrics: loss, grad_norm,
    targets (loss tokens), tokens (real input tokens), lr (when `schedule` is given).
    Under LoRA the returned function keeps `state.frozen` out of the donation.
    """
    loss_fn = make_loss_fn(model, task, compute_dtype=compute_dtype, lora=lora, mask_token_id=mask_token_id,
                           dot_general_cls=dot_general_cls)
    grad_fn = jax.value_and_grad(lambda p, f, b, r: loss_fn(p, f, b, r), has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        B = batch["tokens"].shape[0]
        if B % accum:
            raise ValueError(f"batch size {B} is not divisible by accum={accum}")
        def one(carry, xs):
            i, mb = xs
            (s, n), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (s, n, g)), None

        if accum == 1:  # no loop: XLA fuses the whole step
            (s, n), g = grad_fn(state.params, frozen, batch, jax.random.fold_in(rng, 0))
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, B // accum, *x.shape[1:]), batch)
            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (s, n, g), _ = jax.lax.scan(one, zeros, (jnp.arange(accum), micro))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {"loss": s / denom, "grad_norm": optax.tree.norm(grads), "targets": n,
                   "tokens": jnp.sum(batch["segments"] > 0)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        params = optax.apply_updates(state.params, updates)
        # finite loss and gradients can still overflow in the update: never save such a step
        metrics["params_finite"] = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
        new = state.replace(params=params, opt_state=opt_state, step=state.step + 1, data_pos=state.data_pos + 1)
        return new, metrics

    if lora is None:
        return jax.jit(lambda state, batch: step(state, None, batch), donate_argnums=0)
    jitted = jax.jit(step, donate_argnums=0)

    def lora_step(state, batch):
        new, metrics = jitted(state.replace(frozen=None), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics

    return lora_step


def make_eval_fn(model, task: str, **kw):
    """Jitted (params, frozen, batch) -> (loss sum, count), no dropout, fixed masking key."""
    loss_fn = make_loss_fn(model, task, **kw)
    return jax.jit(lambda p, f, b: loss_fn(p, f, b, jax.random.PRNGKey(0), train=False))


# --- throughput -------------------------------------------------------------------------------
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


@lru_cache(maxsize=None)
def peak_flops(device=None) -> float:
    """Dense peak FLOP/s of a device: datasheet bf16 figures for GPUs/TPUs; on CPU the nominal
    float32 FMA peak, usable cores x clock x FLOPs per cycle (32 with AVX2/FMA or AMD's
    double-pumped AVX-512, 64 with Intel AVX-512, else 16), read from /proc/cpuinfo."""
    device = device or jax.devices()[0]
    for name, flops in PEAK_BF16.items():
        if name.lower() in device.device_kind.lower():
            return flops
    import os

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = max((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), default=2500.0)
    flags = set(next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    per_cycle = (64 if "avx512f" in flags and "GenuineIntel" in info else
                 32 if {"avx2", "fma"} <= flags else 16)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores * mhz * 1e6 * per_cycle


def flops_per_token(cfg, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 N (forward 2N, backward 4N; LoRA skips most weight grads)
    plus attention scores 12 L T D (forward + backward). N counts the weights used in matmuls:
    an untied input embedding is a gather, not a matmul, so it is left out."""
    n = cfg.num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    matmul = 2 * n + 2 * n + 2 * n * trainable_fraction
    return matmul + 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def checkpoint_tree(state: TrainState) -> dict:
    """What a checkpoint holds: everything but the frozen base (reloaded from the model)."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng,
            "data_pos": state.data_pos}
