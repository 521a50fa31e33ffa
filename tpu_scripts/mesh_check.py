"""Check every mesh layout on the devices at hand: params bytes per device (measured from the
arrays' shards), logits latency and greedy decode tokens/s, as a table (+ JSON with --json).

    python3 tpu_scripts/mesh_check.py --preset gemma3-270m          # on a TPU VM / GPU host
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tpu_scripts/mesh_check.py --preset tiny

Weights are random (init sharded straight onto each mesh) unless --model PATH is given.
Every layout loads: a dimension a mesh axis does not divide is replicated on that axis (the load warns once).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

import jaxaccel
from jaxaccel import distributed, sharding
from jaxaccel.config import ModelConfig
from jaxaccel.presets import PRESETS, preset

TINY = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                   num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=512)


def layouts(n: int) -> list[jaxaccel.MeshConfig]:
    shapes = [(n, 1, 1), (1, n, 1), (1, 1, n)]
    if n >= 4 and n % 4 == 0:
        shapes += [(n // 4, 2, 2), (1, n // 4, 4)]
    return [jaxaccel.MeshConfig(*s) for s in dict.fromkeys(shapes)]


def timed(fn, repeats: int = 3) -> float:
    fn()  # compile
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def check(args, mesh_cfg, cfg) -> dict:
    mesh = sharding.build_mesh(mesh_cfg)
    m = jaxaccel.load(args.model, mesh=mesh) if args.model else jaxaccel.init_random(cfg, seed=0, mesh=mesh)
    per_device = sharding.bytes_per_device(m.params)
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (args.batch, args.length)).astype(np.int32)
    logits_s = timed(lambda: m.logits(ids).block_until_ready())
    prompts = ids[:, :16].tolist()
    decode_s = timed(lambda: jaxaccel.generate_tokens(m, prompts, max_new_tokens=args.new_tokens), repeats=1)
    return {"mesh": str(mesh_cfg), "params_mib_per_device": max(per_device.values()) / 2**20,
            "params_mib_total": m.params_bytes / 2**20, "logits_ms": logits_s * 1e3,
            "decode_tok_s": args.batch * args.new_tokens / decode_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", *PRESETS])
    p.add_argument("--model", help="load this checkpoint instead of random weights")
    p.add_argument("--meshes", nargs="*", type=sharding.parse_mesh, help="default: the standard layouts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    distributed.initialize()  # joins the other workers of a pod slice; a no-op on one host
    say = print if distributed.is_main() else (lambda *a, **k: None)
    cfg = TINY if args.preset == "tiny" else preset(args.preset)
    n = jax.device_count()
    say(f"{n} x {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.node()}, "
        f"model {args.model or args.preset}")
    say(f"{'mesh':28s} {'MiB/device':>11s} {'of total':>9s} {'logits ms':>10s} {'decode tok/s':>13s}")
    rows = []
    for mesh_cfg in args.meshes or layouts(n):
        try:
            r = check(args, mesh_cfg, cfg)
        except ValueError as e:
            say(f"{str(mesh_cfg):28s} skipped: {e}")
            continue
        rows.append(r)
        say(f"{r['mesh']:28s} {r['params_mib_per_device']:11.2f} {r['params_mib_per_device'] / r['params_mib_total']:9.3f} "
            f"{r['logits_ms']:10.1f} {r['decode_tok_s']:13.1f}")
    if args.json and distributed.is_main():
        with open(args.json, "w") as f:
            json.dump({"devices": n, "backend": jax.default_backend(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
