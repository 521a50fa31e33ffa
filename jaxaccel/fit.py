"""The `finetune` loop: data -> jitted train step -> metrics (jsonl + TensorBoard) -> orbax
checkpoints -> HF export. Exact resume: the state (params, optimizer state, step, rng, data
position) is all a step depends on, and metrics.jsonl is cut back to the resumed step, so an
interrupted-and-resumed run writes the same loss curve and final params as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from . import data as data_lib
from . import distributed
from . import lora as lora_lib
from . import train as T


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
    """tensorboardX, imported once; it imports torch when installed (~2 s), so `run` starts the
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
    from . import quant

    return quant.dot_general_cls(quant.QuantConfig(mode=mode))


def _evaluate(eval_fn, state, ds, place) -> float:
    s = n = 0.0
    for batch in ds.sequential():
        bs, bn = jax.device_get(eval_fn(state.params, state.frozen, place(batch)))
        s, n = s + float(bs), n + float(bn)
    return s / max(n, 1.0)


def run(model, data, opts: T.TrainOptions, out: Path):
    from .checkpoints import load
    from .checkpoints.store import Store
    from .model import Model

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
    if (opts.task == "sft") != (cfg.head == "causal_lm") or (opts.task == "classify") != (cfg.head == "classifier"):
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
        from . import sharding

        state = sharding.shard_state(state, cfg, mesh)
        place = lambda batch: sharding.shard_batch(batch, mesh)
    else:
        place = lambda batch: batch

    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "checkpoints", {"model": T.model_meta(model), "setup": opts.setup()},
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
                raise T.TrainingError(
                    f"loss {m['loss']} (grad norm {m['grad_norm']}) or the updated params are not finite at step {s}; "
                    "stopped without "
                    f"saving that step. The last good checkpoint is "
                    + (f"step {last} in {store.directory}" if last else "none (no step was saved yet)")
                    + "; lower --lr or set --clip, then rerun the same command to resume from it")
            record = {"step": s, **m, "tokens_per_s": m["tokens"] / dt, "mfu": m["tokens"] / dt * fpt / peak}
            eval_loss = None
            if eval_fn is not None and (s % eval_every == 0 or s == opts.steps):
                eval_loss = record["eval_loss"] = _evaluate(eval_fn, state, eval_ds, place)
            log.write(record)
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


# --- command line (`jaxaccel finetune`): flags map onto TrainOptions ----------------------------
def add_arguments(sp):
    sp.add_argument("--model", required=True, help="HF folder or .gguf file to fine-tune")
    sp.add_argument("--data", required=True, help="train.jsonl ({prompt,completion} | {text,label} | {text}) or .txt")
    sp.add_argument("--eval", dest="eval_data", help="eval data (same format); best checkpoint by eval loss is kept")
    sp.add_argument("--task", default="sft", choices=list(data_lib.TASKS))
    sp.add_argument("--out", required=True, help="output folder; rerunning with the same --out resumes")
    sp.add_argument("--optimizer", default="adamw", choices=list(T.OPTIMIZERS))
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--schedule", default="cosine", choices=list(T.SCHEDULES))
    sp.add_argument("--warmup", type=int, default=0)
    sp.add_argument("--weight-decay", type=float, default=0.0)
    sp.add_argument("--clip", type=float, default=1.0, help="global-norm clipping (0: off)")
    sp.add_argument("--steps", type=int, default=100)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    sp.add_argument("--max-length", type=int)
    sp.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None)
    sp.add_argument("--truncate", action="store_true", help="cut over-long rows (counted) instead of failing")
    sp.add_argument("--save-every", type=int, default=100)
    sp.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints (plus the best by eval loss)")
    sp.add_argument("--lora-rank", type=int, default=0)
    sp.add_argument("--lora-alpha", type=float, default=16.0)
    sp.add_argument("--lora-dropout", type=float, default=0.0)
    sp.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated projection names")
    sp.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="bfloat16: mixed precision")
    sp.add_argument("--quant", choices=["qat"], help="quantization-aware training; the export holds the float weights: serve them "
                    "quantized with `jaxaccel quantize --model OUT --mode qat --out DIR` (the same forward)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                    help="write TensorBoard events to OUT/tb (metrics.jsonl is always written)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="master-weight dtype")
    from .sharding import add_mesh_argument

    add_mesh_argument(sp)
    return sp


def cli_main(args) -> int:
    from .checkpoints import load

    model = load(args.model, dtype=args.dtype, fast_tokenizer=args.task == "sft", mesh=args.mesh)
    keys = ("eval_data", "optimizer", "lr", "schedule", "warmup", "weight_decay", "batch_size", "accum",
            "max_length", "pack", "truncate", "save_every", "keep", "lora_rank", "lora_alpha", "lora_dropout",
            "compute_dtype", "quant", "seed", "tensorboard")
    opts = {k: getattr(args, k) for k in keys}
    opts.update(clip=args.clip or None, lora_targets=tuple(args.lora_targets.split(",")))
    out = Path(args.out)
    T.finetune(model, args.data, task=args.task, steps=args.steps, out=out, **opts)
    if distributed.is_main():
        print(summary(model, out))
    return 0
