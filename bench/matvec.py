"""Decode-step matmuls one by one: jaxaccel's CPU matvec kernel against XLA's dot on the same
weights, per weight shape of a model (default: Gemma 3 270M's), at batch 1 (--rows).

Each shape is timed with its weights read from memory, as in a decode step: distinct copies of
the matrix, about --mib MiB in all (at most 400 copies; far beyond the caches), are multiplied
one after the other inside one jitted program (each product feeds the next input, so none overlap), and the
time per product is the best of --repeats runs / the number of copies. Beside each shape the
host's read bandwidth (arr.sum over 1 GiB on all threads, `bench.common.BandwidthProbe`) is
sampled, because a VM's bandwidth can move 2x within minutes: "% read" = bytes of one
weight / time per product / that bandwidth.

  python -m bench.matvec                       # Gemma 3 270M float32 shapes
  python -m bench.matvec --dtype bfloat16 --rows 8
  python -m bench.matvec --model random        # the ~56M Llama's shapes

The kernel is what `jaxaccel.generate` uses on the CPU for decode steps (`jaxaccel.kernels`):
Dense kernels are [in, out] (w_in_axis 0), the tied embedding's `attend` [vocab, hidden]
(w_in_axis 1). Figures only; never part of the tests' assertions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
OUT = HERE / "results" / "matvec.json"


def model_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, K, N, w_in_axis) of the weights one decode step of `config` multiplies by."""
    h, q, kv, f = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
        config.intermediate_size
    shapes = [("q_proj", h, q, 0), ("k_proj / v_proj", h, kv, 0), ("o_proj", q, h, 0),
              ("gate_proj / up_proj", h, f, 0), ("down_proj", f, h, 0)]
    lm_head = ("embedding (tied lm_head)", config.vocab_size, h, 1) if config.tie_word_embeddings else \
        ("lm_head", h, config.vocab_size, 0)
    return shapes + [lm_head]


def time_shape(K: int, N: int, axis: int, rows: int, dtype, budget: int, repeats: int, kernel: bool) -> dict:
    """Seconds per product x [rows, K] . w for `copies` distinct w (see the module doc)."""
    import jax
    import jax.numpy as jnp

    from bench.common import best_of
    from jaxaccel import kernels

    shape = (K, N) if axis == 0 else (N, K)
    nbytes = K * N * jnp.dtype(dtype).itemsize
    copies = max(1, min(400, budget // nbytes))
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(copies)]
    x = jnp.asarray(rng.standard_normal((rows, K), np.float32))
    dims = (((1,), (axis,)), ((), ()))

    @jax.jit
    def chain(x, ws):
        for w in ws:
            y = kernels.matvec(x, w, axis) if kernel else jax.lax.dot_general(
                x.astype(w.dtype), w, dims, preferred_element_type=jnp.float32)
            x = x + 0 * y[:, :1]  # the next product waits for this one
        return x

    run = lambda: chain(x, ws).block_until_ready()
    run()  # compile
    return {"copies": copies, "bytes": nbytes, "s": best_of(run, repeats) / copies}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-random", choices=["gemma-random", "random"],
                   help="whose weight shapes: Gemma 3 270M's (default) or the ~56M random Llama's")
    p.add_argument("--dtype", default="float32", help="weights: float32 or bfloat16")
    p.add_argument("--rows", type=int, default=1, help="rows of x (the batch), 1..8")
    p.add_argument("--mib", type=int, default=256, help="bytes of weight copies per shape (MiB)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probe-mib", type=int, default=1024, help="size of the bandwidth probe's array")
    p.add_argument("--shapes", default=None, help="only these shape names (comma-separated prefixes)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.dtype not in ("float32", "bfloat16"):
        p.error(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    if not 1 <= args.rows <= 8:
        p.error(f"--rows must be in 1..8 (decode batches), got {args.rows}")
    if args.mib < 1 or args.repeats < 1 or args.probe_mib < 1:
        p.error("--mib, --repeats and --probe-mib must be >= 1")

    import jax
    import jax.numpy as jnp

    from bench.common import BandwidthProbe, flags_text, format_table, machine_info, random_config, write_json
    from jaxaccel import kernels

    backend = jax.default_backend()
    if backend != "cpu" or not kernels.load():
        raise SystemExit(f"bench.matvec times jaxaccel's CPU kernel: it needs the CPU backend and a C++ compiler "
                         f"(backend {backend}, kernels {'unavailable' if backend == 'cpu' else 'not tried'})")
    config = random_config(args.model)
    shapes = model_shapes(config)
    if args.shapes:
        wanted = [s.strip() for s in args.shapes.split(",")]
        shapes = [s for s in shapes if any(s[0].startswith(w) for w in wanted)]
        if not shapes:
            p.error(f"--shapes {args.shapes!r} matches none of {[s[0] for s in model_shapes(config)]}")
    dtype = jnp.dtype(args.dtype)
    machine = machine_info()
    print(f"{machine.get('cpu', '?')} ({flags_text(machine)}): {args.model} shapes, {args.dtype} weights, "
          f"{args.rows} row(s); best of {args.repeats}, >= {args.mib} MiB of copies per shape", flush=True)
    rows, header = [], ["weight", "K x N", "MiB", "kernel us", "kernel GB/s", "kernel % read", "XLA us", "XLA GB/s",
                        "kernel / XLA speed", "read GB/s"]
    results = []
    with BandwidthProbe(args.probe_mib << 20) as probe:
        for name, K, N, axis in shapes:
            kern = time_shape(K, N, axis, args.rows, dtype, args.mib << 20, args.repeats, kernel=True)
            xla = time_shape(K, N, axis, args.rows, dtype, args.mib << 20, args.repeats, kernel=False)
            read = probe.sample()["read"]
            gbs = lambda r: r["bytes"] / r["s"] / 1e9
            results.append({"weight": name, "K": K, "N": N, "w_in_axis": axis, "kernel": kern, "xla": xla,
                            "read_bw": read, "kernel_pct_read": 100 * gbs(kern) * 1e9 / read})
            rows.append([name, f"{K} x {N}", f"{kern['bytes'] / 2**20:.2f}", f"{kern['s'] * 1e6:.1f}",
                         f"{gbs(kern):.1f}", f"{100 * gbs(kern) * 1e9 / read:.0f}", f"{xla['s'] * 1e6:.1f}",
                         f"{gbs(xla):.1f}", f"{xla['s'] / kern['s']:.2f}x", f"{read / 1e9:.1f}"])
            print(f"  timed {name} ({len(rows)}/{len(shapes)})", file=sys.stderr, flush=True)
    print(format_table(header, rows))
    doc = {"benchmark": "matvec", "argv": argv, "machine": machine, "settings": vars(args), "results": results}
    write_json(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
