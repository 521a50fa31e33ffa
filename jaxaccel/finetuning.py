"""Fine-tuning: `finetune(model, data, ...)` and its options (`TrainOptions`): data -> jitted
train step (train.py) -> metrics (jsonl + TensorBoard) -> orbax checkpoints -> HF export.
Exact resume: the state (params, optimizer state, step, rng, data position) is all a step
depends on, and metrics.jsonl is cut back to the resumed step, so an interrupted-and-resumed run
writes the same loss curve and final params as an uninterrupted one.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from . import data as data_lib
from . import distributed, quant, sharding
from . import lora as lora_lib
from . import train as T
from .checkpoints.store import Store
from .model import Model, load


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss / gradients); the message names the step and checkpoint."""


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Every `finetune` option (CLI flags map onto these fields)."""

    task: str = "sft"
    steps: int = 100
    batch_size: int = 8
    accum: int = 1
    max_length: int | None = None  # default: the model's max positions, at most 1024
    pack: bool | None = None  # default: on for sft
    truncate: bool = False
    optimizer: str = "adamw"
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip: float | None = 1.0
    compute_dtype: str | None = None  # "bfloat16": bf16 compute on float32 master weights
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    async_save: bool = True
    eval_data: Any = None
    eval_every: int | None = None  # default: save_every
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    quant: str | None = None  # "qat": train through quant.py's QAT dot_general
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if self.task not in data_lib.TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(data_lib.TASKS)}")
        for name in ("steps", "batch_size", "accum", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by accum {self.accum}")
        if self.quant not in (None, "qat"):
            raise ValueError(f"unknown quant mode {self.quant!r} for training; only 'qat' is supported")
        finite = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        for name, low, high in (("lr", 0.0, None), ("clip", 0.0, None), ("weight_decay", None, None),
                                ("momentum", None, 1.0), ("lora_alpha", 0.0, None), ("lora_dropout", None, 1.0)):
            value = getattr(self, name)
            if value is None and name == "clip":
                continue  # no clipping
            if not finite(value) or (low is not None and value <= low) or (high is not None and value >= high) \
                    or (low is None and value < 0):
                bound = (f"> {low}" if low is not None else ">= 0") + (f" and < {high}" if high is not None else "")
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        for name in ("warmup", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup >= self.steps and self.warmup:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")

    @property
    def lora(self) -> lora_lib.LoraConfig | None:
        if not self.lora_rank:
            return None
        return lora_lib.LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                                   targets=tuple(self.lora_targets))

    def setup(self) -> dict:
        """What fixes the checkpoint's structure (a resume must match it)."""
        return {"task": self.task, "optimizer": self.optimizer, "lora": self.lora and asdict(self.lora),
                "quant": self.quant, "batch_size": self.batch_size, "accum": self.accum, "seed": self.seed,
                "max_length": self.max_length, "pack": self.pack}


def model_meta(model) -> dict:
    return json.loads(json.dumps(asdict(model.config)))


def finetune(model, data, *, task: str = "sft", steps: int = 100, out, **options):
    """Fine-tune `model` (a Model or a checkpoint path) on `data` (a .jsonl/.txt path or rows).

    Writes OUT/checkpoints (orbax; the same call on the same `out` resumes from the latest
    committed step), OUT/metrics.jsonl (one JSON object per step), OUT/tb (TensorBoard),
    OUT/lora (adapters alone, under LoRA) and the final model as an HF folder at OUT's root,
    so `jaxaccel.load(out)` loads the result. Returns the fine-tuned Model.
    Options: see `TrainOptions`.
    """
    return run(model, data, TrainOptions(task=task, steps=steps, **options), Path(out))


class DivergenceWatch:
    """Tells a calm step from a diverging one, so that checkpoints taken while the loss blows up
    (finite, but exploded params) never push the last calm one out: a step is not calm when its
    loss is above SPIKE x the median of the last WINDOW losses (or its gradient norm above
    GRAD_SPIKE x theirs); it is calm again once the loss is back under the threshold."""

    WINDOW, SPIKE, GRAD_SPIKE = 16, 3.0, 20.0

    def __init__(self):
        self.losses: list[float] = []
        self.grads: list[float] = []
        self.since: int | None = None  # the step the current spike began at

    def update(self, step: int, loss: float, grad_norm: float, log=None) -> bool:
        """Record a step's loss and gradient norm; whether the step is calm (may be saved)."""
        if len(self.losses) >= self.WINDOW:
            median = sorted(self.losses)[len(self.losses) // 2]
            grad_median = sorted(self.grads)[len(self.grads) // 2]
            spiking = loss > self.SPIKE * max(median, 1e-6) or grad_norm > self.GRAD_SPIKE * max(grad_median, 1e-6)
            if spiking and self.since is None:
                self.since = step
                if log:
                    log(f"step {step}: loss {loss:.4g} (grad norm {grad_norm:.3g}) spiked above {self.SPIKE:g}x the "
                        f"recent median {median:.4g}; no checkpoint is saved until it settles")
            elif not spiking and self.since is not None:
                if log:
                    log(f"step {step}: the loss settled ({loss:.4g}); saving checkpoints again")
                self.since = None
            if spiking:
                return False  # a spike stays out of the window, which keeps describing calm steps
        self.losses, self.grads = (self.losses + [loss])[-self.WINDOW:], (self.grads + [grad_norm])[-self.WINDOW:]
        return True


class MetricsLog:
    """OUT/metrics.jsonl (one object per step) + TensorBoard events in OUT/tb. Opening it at
    `resume_step` drops records after that step (and a torn last line) so the file matches
    the state being resumed."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool = True):
        self.path = out / "metrics.jsonl"
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if rec.get("step", math.inf) <= resume_step:
                    kept.append(line + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            self.tb = tensorboard_module().SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


_TB = None


def tensorboard_module(background: bool = False):
    """tensorboardX, imported once; it imports torch when installed (slow), so `run` starts the
    import in a thread (background=True) that overlaps loading and compiling."""
    global _TB
    if _TB is None:
        import concurrent.futures

        _TB = concurrent.futures.ThreadPoolExecutor(1).submit(importlib.import_module, "tensorboardX")
    return None if background else _TB.result()


def export(model, out: Path) -> None:
    """Write the HF folder's files into OUT's root (beside checkpoints/, metrics.jsonl, ...):
    each file is written in a temp folder first and renamed into place."""
    tmp = out / ".export"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_hf(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors"):  # weights last
        os.replace(f, out / f.name)
    tmp.rmdir()


def _quant_dot(mode):
    if mode is None:
        return None
    return quant.dot_general_cls(quant.QuantConfig(mode=mode))


def _evaluate(eval_fn, state, ds, place) -> float:
    s = n = 0.0
    for batch in ds.sequential():
        bs, bn = jax.device_get(eval_fn(state.params, state.frozen, place(batch)))
        s, n = s + float(bs), n + float(bn)
    return s / max(n, 1.0)


def run(model, data, opts: TrainOptions, out: Path):
    """The loop behind `finetune` (see there)."""
    if opts.tensorboard:
        tensorboard_module(background=True)
    if not isinstance(model, Model):
        model = load(model, fast_tokenizer=opts.task == "sft")
    cfg = model.config
    main = distributed.is_main()
    if model.quant is not None and model.quant.integer:
        raise ValueError(f"this model is quantized ({model.quant.mode}): its int weights cannot be trained. "
                         "Fine-tune the float checkpoint (add --quant qat for quantization-aware training), "
                         "then `jaxaccel quantize` the result")
    if cfg.family == "bert" and opts.task == "classify" and cfg.head != "classifier":
        # a classifier started from an encoder: a new head over the classes the data names
        model = model.with_head("classifier", data_lib.labels_in(data), seed=opts.seed)
    elif cfg.family == "bert" and opts.task == "mlm" and cfg.head != "masked_lm":
        model = model.with_head("masked_lm", seed=opts.seed)  # decoder tied to the word embeddings
    cfg = model.config
    if (opts.task == "sft") != (cfg.head == "causal_lm") or (opts.task == "classify") != (cfg.head == "classifier") \
            or (opts.task == "mlm") != (cfg.head == "masked_lm"):
        raise ValueError(f"task {opts.task!r} does not fit this model's {cfg.head!r} head "
                         "(sft: causal LM; classify: sequence classifier; mlm: masked LM)")
    if opts.task == "classify" and (cfg.problem_type not in (None, "single_label_classification") or len(cfg.labels) < 2):
        raise ValueError(f"classify fine-tuning trains single-label classifiers (softmax cross-entropy over 2 or "
                         f"more labels); this checkpoint is {cfg.problem_type or 'unspecified'} with "
                         f"{len(cfg.labels)} label(s), which it would train wrongly")
    max_len = opts.max_length or min(cfg.max_position_embeddings, 1024)
    load_kw = dict(max_length=max_len, batch_size=opts.batch_size, pack=opts.pack, truncate=opts.truncate,
                   labels=cfg.labels)
    ds = data_lib.load(data, model.tokenizer, opts.task, seed=opts.seed, **load_kw)
    eval_ds = None if opts.eval_data is None else data_lib.load(opts.eval_data, model.tokenizer, opts.task, **load_kw)
    schedule = T.make_schedule(opts.lr, opts.steps, opts.schedule, opts.warmup)
    optimizer = T.make_optimizer(opts.optimizer, schedule, weight_decay=opts.weight_decay, momentum=opts.momentum,
                                 clip=opts.clip)
    step_kw = dict(compute_dtype=opts.compute_dtype, lora=opts.lora, dot_general_cls=_quant_dot(opts.quant),
                   mask_token_id=getattr(model.tokenizer, "mask_token_id", None) if opts.task == "mlm" else None)
    state = T.init_state(model, optimizer, opts.seed, opts.lora)
    mesh = model.mesh
    if mesh is not None:  # params, optimizer state and batches over the mesh (see sharding.RULES)
        state = sharding.shard_state(state, cfg, mesh)
        place = lambda batch: sharding.shard_batch(batch, mesh)
    else:
        place = lambda batch: batch

    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "checkpoints", {"model": model_meta(model), "setup": opts.setup()},
                  save_every=opts.save_every, keep=opts.keep, best=eval_ds is not None, async_save=opts.async_save)
    start = store.latest_step() or 0
    if start:
        state = T.TrainState(**store.restore(target=T.checkpoint_tree(state)), frozen=state.frozen)
        if main:
            print(f"resuming from step {start} of {out / 'checkpoints'}", file=sys.stderr)
    log = MetricsLog(out, start, opts.tensorboard) if main else _NoLog()
    step_fn = T.make_train_step(model, optimizer, opts.task, accum=opts.accum, schedule=schedule, **step_kw)
    eval_fn = T.make_eval_fn(model, opts.task, **step_kw) if eval_ds is not None else None
    trainable = sum(x.size for x in jax.tree.leaves(state.params)) / max(cfg.num_params, 1)
    fpt, peak = T.flops_per_token(cfg, ds.arrays["tokens"].shape[1], min(trainable, 1.0)), T.peak_flops()
    eval_every = opts.eval_every or opts.save_every
    pos = int(state.data_pos)
    watch = DivergenceWatch()
    bar = tqdm(total=opts.steps, initial=start, desc=f"finetune {opts.task}", unit="step", disable=not (opts.progress and main))
    try:
        for s in range(start + 1, opts.steps + 1):
            t = time.perf_counter()
            state, m = step_fn(state, place(ds.batch(pos)))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t
            pos += 1
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m.pop("params_finite", 1.0)):
                store.wait()
                last = store.latest_step()
                raise TrainingError(
                    f"loss {m['loss']} (grad norm {m['grad_norm']}) or the updated params are not finite at step {s}; "
                    "stopped without "
                    f"saving that step. The last good checkpoint is "
                    + (f"step {last} in {store.directory}" if last else "none (no step was saved yet)")
                    + (f" (saved before the loss spiked at step {watch.since})" if watch.since else "")
                    + "; lower --lr or set --clip, then rerun the same command to resume from it")
            calm = watch.update(s, m["loss"], m["grad_norm"], log=bar.write if main else None)
            record = {"step": s, **m, "tokens_per_s": m["tokens"] / dt, "mfu": m["tokens"] / dt * fpt / peak}
            eval_loss = None
            if eval_fn is not None and (s % eval_every == 0 or s == opts.steps):
                eval_loss = record["eval_loss"] = _evaluate(eval_fn, state, eval_ds, place)
            log.write(record)
            if calm or s == opts.steps:  # while the loss spikes, the last calm checkpoint stays the latest
                store.save(s, T.checkpoint_tree(state), eval_loss, force=s == opts.steps)
            bar.update()
            bar.set_postfix(loss=f"{m['loss']:.4f}")
        store.wait()
    finally:
        bar.close()
        log.close()
        store.close()
    params = state.params
    if opts.lora is not None:
        params = lora_lib.merge(state.frozen, state.params, opts.lora)
    # several hosts: every process joins the gathers; process 0 alone writes the files
    host = distributed.gather if jax.process_count() > 1 else (lambda tree: tree)
    adapters, merged = host(state.params), host(params)
    if main:
        if opts.lora is not None:
            lora_lib.save(out / "lora", adapters, opts.lora)
        export(Model(cfg, merged, model.tokenizer, model.dtype), out)
    distributed.barrier("jaxaccel finetune export")
    return Model(cfg, params, model.tokenizer, model.dtype, mesh=mesh)


class _NoLog:
    """Processes other than 0 write no metrics (process 0 has the same values)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def summary(model, out: Path) -> str:
    """A short table of the run's last metrics (for the CLI)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    if not lines:
        return f"{out}: no steps run"
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    rows = [("steps", last["step"]), ("loss (first -> last)", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
            ("tokens/s (last step)", f"{last['tokens_per_s']:.0f}"), ("MFU (last step)", f"{last['mfu']:.1%}")]
    if "eval_loss" in last:
        rows.append(("eval loss", f"{last['eval_loss']:.4f}"))
    rows.append(("model", str(out)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
