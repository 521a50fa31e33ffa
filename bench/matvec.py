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
  python -m bench.matvec --dtype int8          # as QuantConfig("int8") stores them: [out, in] codes,
                                               # a scale per output (per 32 inputs for the embedding)
  python -m bench.matvec --dtype int4          # codes + scale + zero per 32 inputs, two codes a byte
  python -m bench.matvec --dtype Q5_0          # a GGUF file's blocks as stored (Q4_0, Q5_0, Q8_0, Q4_K,
                                               # Q6_K; shapes whose inputs the block does not divide are skipped)
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
GGML_DTYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K")  # kernels.ggml.BLOCKS: a GGUF file's blocks as stored
DTYPES = ("float32", "bfloat16", "int8", "int4") + GGML_DTYPES


def model_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, K, N, w_in_axis) of the weights one decode step of `config` multiplies by."""
    h, q, kv, f = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
        config.intermediate_size
    shapes = [("q_proj", h, q, 0), ("k_proj / v_proj", h, kv, 0), ("o_proj", q, h, 0),
              ("gate_proj / up_proj", h, f, 0), ("down_proj", f, h, 0)]
    lm_head = ("embedding (tied lm_head)", h, config.vocab_size, 1) if config.tie_word_embeddings else \
        ("lm_head", h, config.vocab_size, 0)
    return shapes + [lm_head]


# the int8 embedding's inputs per scale (QuantConfig.embedding_group_size); the int8 layers have one
# scale per output (int8_group_size None); int4 weights take QuantConfig.group_size
EMBEDDING_GROUP, INT4_GROUP = 32, 32


def random_weight(K: int, N: int, axis: int, dtype: str, rng):
    """(mode, stored arrays) of a random weight as the serving program holds it: float [K, N] / [N, K]
    for float dtypes, else QuantConfig's [out, in] codes with float32 scales (and zeros for int4)."""
    import jax.numpy as jnp

    if dtype in ("float32", "bfloat16"):
        shape = (K, N) if axis == 0 else (N, K)
        return dtype, (jnp.asarray(rng.standard_normal(shape, np.float32), dtype),)
    if dtype in GGML_DTYPES:  # random codes; every float16 scale (d, and dmin in Q4_K) 0.01
        from jaxaccel.kernels import ggml

        _, inputs, nbytes = ggml.BLOCKS[dtype]
        blocks = rng.integers(0, 256, (N, K // inputs, nbytes), dtype=np.uint8)
        half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        for at in {"Q4_K": (0, 2), "Q6_K": (208,)}.get(dtype, (0,)):
            blocks[..., at:at + 2] = half
        return dtype, (jnp.asarray(blocks.reshape(N, -1)),)
    groups = K // INT4_GROUP if dtype == "int4" else K // EMBEDDING_GROUP if axis == 1 else 1
    scale = jnp.asarray(rng.random((N, groups), np.float32) * 0.01 + 0.001)
    if dtype == "int8":
        return dtype, (jnp.asarray(rng.integers(-127, 128, (N, K), dtype=np.int8)), scale)
    zero = jnp.asarray(-8 * scale)
    return dtype, (jnp.asarray(rng.integers(0, 256, (N, K // 2), dtype=np.uint8)), scale, zero)


def product(x, mode: str, stored: tuple, axis: int, kernel: bool):
    """x [rows, K] times the stored weight: through jaxaccel's CPU kernel, or XLA's ops (for
    integer weights: what the serving program does without the kernels, dequantize then dot)."""
    import jax
    import jax.numpy as jnp

    from jaxaccel import kernels, quant, quant_ggml
    from jaxaccel.kernels import ggml

    if mode in GGML_DTYPES:
        return ggml.matvec(x, stored[0], mode) if kernel else quant_ggml.serve_dot(mode, x, stored[0], jnp.float32)
    if mode in ("float32", "bfloat16"):
        w = stored[0]
        if kernel:
            return kernels.matvec(x, w, axis)
        return jax.lax.dot_general(x.astype(w.dtype), w, (((1,), (axis,)), ((), ())), preferred_element_type=jnp.float32)
    if kernel:
        y = kernels.dot(x, stored[0], 1, jnp.float32, stored[1]) if mode == "int8" else \
            kernels.dot_int4(x, *stored, jnp.float32)
        if y is None:
            raise SystemExit(f"the {mode} kernel does not take this shape ({x.shape[1]} inputs)")
        return y
    return quant._serve_dot(mode, x, (*stored, None)[:3], jnp.float32)


def time_shape(K: int, N: int, axis: int, rows: int, dtype: str, budget: int, repeats: int, kernel: bool) -> dict:
    """Seconds per product x [rows, K] . w for `copies` distinct w (see the module doc)."""
    import jax
    import jax.numpy as jnp

    from bench.common import best_of

    rng = np.random.default_rng(0)
    mode, first = random_weight(K, N, axis, dtype, rng)
    nbytes = sum(a.nbytes for a in first)  # the codes and their scales / zeros: all read per product
    copies = max(1, min(400, budget // nbytes))
    ws = [first] + [random_weight(K, N, axis, dtype, rng)[1] for _ in range(copies - 1)]
    x = jnp.asarray(rng.standard_normal((rows, K), np.float32))

    @jax.jit
    def chain(x, ws):
        for w in ws:
            y = product(x, mode, w, axis, kernel)
            x = x + 0 * y[:, :1]  # the next product waits for this one
        return x

    run = lambda: chain(x, ws).block_until_ready()
    run()  # compile
    return {"copies": copies, "bytes": nbytes, "s": best_of(run, repeats) / copies}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-random", choices=["gemma-random", "random"],
                   help="whose weight shapes: Gemma 3 270M's (default) or the ~56M random Llama's")
    p.add_argument("--dtype", default="float32", help="weights: float32, bfloat16, int8 or int4")
    p.add_argument("--rows", type=int, default=1, help="rows of x (the batch), 1..8")
    p.add_argument("--mib", type=int, default=256, help="bytes of weight copies per shape (MiB)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probe-mib", type=int, default=1024, help="size of the bandwidth probe's array")
    p.add_argument("--shapes", default=None, help="only these shape names (comma-separated prefixes)")
    p.add_argument("--no-xla", action="store_true",
                   help="time the kernel only (XLA's int8 / int4 programs of ~400 products compile for minutes)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if not 1 <= args.rows <= 8:
        p.error(f"--rows must be in 1..8 (decode batches), got {args.rows}")
    if args.mib < 1 or args.repeats < 1 or args.probe_mib < 1:
        p.error("--mib, --repeats and --probe-mib must be >= 1")

    import jax

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
    dtype = args.dtype
    if dtype in GGML_DTYPES:
        from jaxaccel.kernels import ggml

        inputs = ggml.BLOCKS[dtype][1]
        skipped = [s[0] for s in shapes if s[1] % inputs]
        shapes = [s for s in shapes if s[1] % inputs == 0]
        if skipped:
            print(f"skipped (inputs not a multiple of {dtype}'s {inputs}): {', '.join(skipped)}", flush=True)
        if not shapes:
            p.error(f"no shape of {args.model} has inputs a multiple of {dtype}'s block of {inputs}")
    machine = machine_info()
    print(f"{machine.get('cpu', '?')} ({flags_text(machine)}): {args.model} shapes, {args.dtype} weights, "
          f"{args.rows} row(s); best of {args.repeats}, >= {args.mib} MiB of copies per shape", flush=True)
    rows, header = [], ["weight", "K x N", "MiB", "kernel us", "kernel GB/s", "kernel % read", "XLA us", "XLA GB/s",
                        "kernel / XLA speed", "read GB/s"]
    results = []
    with BandwidthProbe(args.probe_mib << 20) as probe:
        for name, K, N, axis in shapes:
            kern = time_shape(K, N, axis, args.rows, dtype, args.mib << 20, args.repeats, kernel=True)
            xla = None if args.no_xla else time_shape(K, N, axis, args.rows, dtype, args.mib << 20, args.repeats,
                                                      kernel=False)
            read = probe.sample()["read"]
            gbs = lambda r: r["bytes"] / r["s"] / 1e9
            results.append({"weight": name, "K": K, "N": N, "w_in_axis": axis, "kernel": kern, "xla": xla,
                            "read_bw": read, "kernel_pct_read": 100 * gbs(kern) * 1e9 / read})
            rows.append([name, f"{K} x {N}", f"{kern['bytes'] / 2**20:.2f}", f"{kern['s'] * 1e6:.1f}",
                         f"{gbs(kern):.1f}", f"{100 * gbs(kern) * 1e9 / read:.0f}",
                         *(["-"] * 3 if xla is None else
                           [f"{xla['s'] * 1e6:.1f}", f"{gbs(xla):.1f}", f"{xla['s'] / kern['s']:.2f}x"]),
                         f"{read / 1e9:.1f}"])
            print(f"  timed {name} ({len(rows)}/{len(shapes)})", file=sys.stderr, flush=True)
    print(format_table(header, rows))
    doc = {"benchmark": "matvec", "argv": argv, "machine": machine, "settings": vars(args), "results": results}
    write_json(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
