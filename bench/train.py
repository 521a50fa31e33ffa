"""Training benchmark: tokens/s of one AdamW step, jaxaccel vs transformers (PyTorch eager),
same model, same weights, same batch, same process; ratio and an MFU estimate.

How each number is taken
  jaxaccel      `train.make_train_step` (jit, donated state, AdamW + global-norm clipping 1.0);
                the host waits for each step's loss, as `finetune` does.
  transformers  `LlamaForCausalLM` (eager attention) forward with labels, backward,
                `clip_grad_norm_(1.0)`, `torch.optim.AdamW` step, `zero_grad`.
  timing        4 warm-up steps each (compilation excluded), then --steps rounds timing one
                step of each in turn, so background load hits both alike; median per step.
  tokens/s      batch * length / median step seconds (every token is a training token).
  MFU           tokens/s * training FLOPs per token (`train.flops_per_token`: 6 N + attention)
                / peak (`train.peak_flops`). Peak on CPU: the nominal float32 FMA peak
                (cores x clock x FLOPs/cycle from /proc/cpuinfo); on GPU/TPU the datasheet bf16 peak.
  first loss    both sides' loss on the first batch (same weights), as a sanity check.

GPU (`--gpu`, default when JAX sees a GPU): a ~1.1B Llama (TinyLlama shape) trained with
bf16 compute on float32 master weights; jaxaccel only (the competitor run is CPU-only).

Never part of the tests. Examples:
  python bench/train.py               # CPU: ~20M-param Llama, batch 8 x 128
  python bench/train.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import flags_text, format_table, machine_info, write_json  # noqa: E402

CPU_CONFIG = dict(family="llama", vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6,
                  num_heads=6, num_kv_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5)
QUICK_CONFIG = dict(CPU_CONFIG, vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=32)
GPU_CONFIG = dict(family="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                  num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5)


def batch_of(vocab: int, batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (batch, length)).astype(np.int32)
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
            "segments": ones, "weights": ones, "labels": np.full((batch,), -1, np.int32)}


def jax_stepper(model, batch: dict, compute_dtype=None):
    """() -> loss of one jaxaccel training step (the host waits for the loss)."""
    import jax

    from jaxaccel import train

    opt = train.make_optimizer("adamw", 1e-4, schedule="constant", clip=1.0)
    step = train.make_train_step(model, opt, "sft", compute_dtype=compute_dtype)
    box = {"state": train.init_state(model, opt)}
    batch = jax.device_put(batch)

    def one():
        box["state"], m = step(box["state"], batch)
        return float(m["loss"])

    return one


def torch_stepper(folder: Path, batch: dict):
    """() -> loss of one transformers training step (eager forward, backward, clip, AdamW)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                                              dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(batch["tokens"], dtype=torch.long)

    def one():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return one


def measure(steppers: dict, steps: int) -> dict:
    """Warm-up steps each (compilation, allocators), then `steps` rounds that time one step of each
    implementation in turn (so background load hits both alike); median seconds per step."""
    out = {name: {"first_loss": one(), "times": []} for name, one in steppers.items()}
    for one in steppers.values():
        for _ in range(3):  # torch's allocator and thread pool need a few steps to settle
            one()
    for _ in range(steps):
        for name, one in steppers.items():
            t = time.perf_counter()
            one()
            out[name]["times"].append(time.perf_counter() - t)
    for r in out.values():
        r["seconds_per_step"] = float(np.median(r["times"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--batch", type=int)
    p.add_argument("--length", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import jax

    from jaxaccel import ModelConfig, init_random, train

    gpu = args.gpu if args.gpu is not None else jax.devices()[0].platform == "gpu"
    if gpu:
        cfg, B, T, steps, dtype = GPU_CONFIG, 8, 1024, 10, "bfloat16"  # scores kept for backward: ~1.5 GB/layer
    elif args.quick:
        cfg, B, T, steps, dtype = QUICK_CONFIG, 4, 64, 3, None
    else:
        cfg, B, T, steps, dtype = CPU_CONFIG, 8, 128, 7, None
    B, T, steps = args.batch or B, args.length or T, args.steps or steps
    config = ModelConfig(**cfg)
    model = init_random(config, seed=0)
    batch = batch_of(config.vocab_size, B, T)
    fpt = train.flops_per_token(config, T)
    peak = train.peak_flops()
    steppers = {"jaxaccel": jax_stepper(model, batch, dtype)}
    tmp = tempfile.TemporaryDirectory()
    if not gpu:
        model.save_hf(Path(tmp.name) / "m")
        steppers["transformers eager"] = torch_stepper(Path(tmp.name) / "m", batch)
    results = measure(steppers, steps)
    tmp.cleanup()
    rows = []
    for name, r in results.items():
        r["tokens_per_s"] = B * T / r["seconds_per_step"]
        r["mfu"] = r["tokens_per_s"] * fpt / peak
        rows.append([name, f"{r['tokens_per_s']:.0f}", f"{r['seconds_per_step'] * 1e3:.1f}", f"{r['mfu']:.1%}",
                     f"{r['first_loss']:.5f}"])
    peak_kind = "nominal f32 FMA" if jax.devices()[0].platform == "cpu" else "datasheet bf16"
    print(f"training: {config.num_params / 1e6:.1f}M-param llama, batch {B} x {T}, AdamW, median of {steps} "
          f"alternating steps, {'bf16 compute / f32 master' if dtype else 'float32'}; peak {peak / 1e9:.0f} "
          f"GFLOP/s ({peak_kind}), {fpt / 1e6:.1f} MFLOP/token")
    print(format_table(["implementation", "tokens/s", "ms/step", "MFU", "first loss"], rows))
    if "transformers eager" in results:
        ratio = results["jaxaccel"]["tokens_per_s"] / results["transformers eager"]["tokens_per_s"]
        print(f"jaxaccel / transformers eager: {ratio:.2f}x (target >= 2x)")
        results["ratio"] = ratio
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cpus_usable']} usable CPUs, devices {info['jax_devices']}; {flags_text(info)}")
    out = args.out or ROOT / "bench" / "results" / f"train{'_gpu' if gpu else ''}{'_quick' if args.quick else ''}.json"
    write_json({"date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "machine": info,
                "config": cfg, "batch": B, "length": T, "steps": steps, "compute_dtype": dtype,
                "peak_flops": peak, "flops_per_token": fpt, "results": results}, out)


if __name__ == "__main__":
    main()
