"""Encoder benchmark: sentences/s for jaxaccel, transformers (PyTorch eager) and ONNX Runtime
on the same weights, in the same process.

Scenarios
  bert-base 8x128  a randomly initialised BERT-base shape (12 layers, D=768, 110M params):
                   one fixed [8, 128] batch of random token ids, all real tokens; the
                   measured call is forward + mean pooling + L2 normalize (no tokenization).
  minilm corpus    the embedded all-MiniLM-L6-v2 embedding 2,000 mixed-length sentences
                   end to end (tokenization included): jaxaccel `Model.embed` (short texts
                   packed several to a row, longer ones length-sorted and bucketed; the
                   unpacked, bucketed-only time is reported too); transformers and ONNX Runtime get the same
                   courtesy sentence-transformers gives itself: batches of --batch texts sorted
                   by length, padded to the longest text of each batch.
ONNX: `torch.onnx.export` (TorchScript exporter, opset 17) of the same torch module (forward +
mean pooling + normalize) with dynamic batch and length; CPUExecutionProvider.
Every timing is the median of --repeats rounds after a warm-up run (compilation excluded; the
jaxaccel warm-up compile time is reported); each round runs every implementation once, in turn.
Outputs of the three are compared (min cosine).
jaxaccel also runs with dtype=bfloat16 (params and activations; GEMMs with float32 sums), in the
same rounds: its sentences/s, its speed over ONNX Runtime (float32) and its min cosine against
transformers float32 are the "bf16" columns.
Dynamic-range int8 (MiniLM corpus, same rounds): jaxaccel w8a8 (`QuantConfig(mode="w8a8")`: int8
weights per channel, activations quantized per token at run time, the int8 GEMM kernel) against
ONNX Runtime's `quantize_dynamic` model of the same export (QInt8 weights per channel): their
sentences/s, ratios and min / mean cosine with transformers float32 (`bench/encoder_int8.py`).

Never part of the tests. Example:
  python -m bench.encoder                # both scenarios, JSON in bench/results/encoder.json
  python -m bench.encoder --quick        # smoke run: 200 sentences, 1 repeat
  python -m bench.encoder --scenarios attention   # the attention core: XLA vs the CPU kernel
  python -m bench.encoder --scenarios gemm        # XLA's GEMM: float32 vs bfloat16 (float32 / bfloat16 result),
                                                  # and the w8a8 dot through AQT / XLA vs the int8 kernel
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import encoder_int8  # noqa: E402
from bench.common import format_table, machine_info, write_json  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "encoder.json"
QUICK_OUT = Path(__file__).resolve().parent / "results" / "encoder_quick.json"
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
WORDS = ("the a of to and in is it that for on with as was at by an be this are from or have not but what all "
         "were when we there can more if no out so said up its about into than them only other new some could "
         "time these two may then do first any my now such like our over man me even most made after also did "
         "many before must through back years where much your way well down should because each just those "
         "machine learning vector embedding sentence café naïve 東京 données über encyclopedia ").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """n sentences: ~70% short (1-24 words), ~25% medium (25-79), ~5% long (80-199), a few empty."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        k = 0 if u < 0.01 else int(rng.integers(1, 25) if u < 0.7 else rng.integers(25, 80) if u < 0.95
                                   else rng.integers(80, 200))
        out.append(" ".join(rng.choice(WORDS, k)).capitalize() + ("." if k else ""))
    return out


SETTLE_S = 0.5  # pause before each timed call: the previous library's worker threads stop spinning


def timed(fns: dict, repeats: int) -> dict:
    """name -> (warm-up seconds, median seconds, last result). After one warm-up call each, every
    round calls each function once in turn, so a slow spell of a shared machine (its speed can
    drift over minutes) slows all of them alike instead of one. Each timed call starts
    SETTLE_S after the last one ended: torch's OpenMP and ONNX Runtime's pool threads spin-wait
    for a while after their work, on the same cores the next call needs."""
    warm, times, outs = {}, {name: [] for name in fns}, {}
    for name, fn in fns.items():
        t = time.perf_counter()
        outs[name] = fn()
        warm[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: (warm[name], statistics.median(times[name]), outs[name]) for name in fns}


def no_grad(fn):
    import torch

    def run():
        with torch.inference_mode():
            return fn()
    return run


def Pooled(bert):
    """torch module: BertModel -> mean pooling over real tokens -> L2 normalize."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=-1)

    return MeanPooled().eval()


def export_onnx(module, path: Path) -> "object":
    import onnxruntime as ort
    import torch

    ids = torch.ones((2, 8), dtype=torch.long)
    torch.onnx.export(module, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "B", 1: "T"}, "attention_mask": {0: "B", 1: "T"}})
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def sorted_batches(tok, texts: list[str], batch: int, limit: int):
    """Length-sorted batches of (row indices, ids, mask), padded per batch (sentence-transformers' way)."""
    lengths = [len(r) for r in tok(texts, truncation=True, max_length=limit)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    for s in range(0, len(texts), batch):
        rows = order[s:s + batch]
        enc = tok([texts[r] for r in rows], padding=True, truncation=True, max_length=limit, return_tensors="np")
        yield rows, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def run_corpus(tok, texts, batch, limit, dim, fn) -> np.ndarray:
    out = np.zeros((len(texts), dim), np.float32)
    for rows, ids, mask in sorted_batches(tok, texts, batch, limit):
        out[rows] = fn(ids, mask)
    return out


def per_batch_padding(lengths, batch: int) -> int:
    """Tokens the transformers / ONNX Runtime runs compute: sorted batches padded to their longest."""
    ordered = sorted(lengths, reverse=True)
    return sum(len(ordered[s:s + batch]) * ordered[s] for s in range(0, len(ordered), batch))


def min_cos(a, b) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def bench_fixed(tmp: Path, repeats: int, B: int, T: int) -> dict:
    import torch
    import transformers

    import jaxaccel
    from jaxaccel import encoder_tasks

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**BERT_BASE)).eval()
    bert.save_pretrained(tmp / "bert-base", safe_serialization=True)
    m = jaxaccel.load(tmp / "bert-base")
    m16 = jaxaccel.load(tmp / "bert-base", dtype="bfloat16")
    ids = np.random.default_rng(0).integers(1000, BERT_BASE["vocab_size"], (B, T))
    mask = np.ones_like(ids)
    fn, fn16 = encoder_tasks.programs(m)["embed"], encoder_tasks.programs(m16)["embed"]
    jids, jmask = jaxaccel_inputs(ids, mask)
    pooled = Pooled(bert)
    sess = export_onnx(pooled, tmp / "bert-base.onnx")
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
    got = timed({"jaxaccel": lambda: np.asarray(fn(m.params, jids, jmask)),
                 "bfloat16": lambda: np.asarray(fn16(m16.params, jids, jmask)),
                 "transformers": no_grad(lambda: pooled(torch.tensor(ids), torch.tensor(mask)).numpy()),
                 "onnxruntime": lambda: sess.run(None, feed)[0]}, repeats)
    (jw, jt, jout), (_, tt, tout), (_, ot, oout) = got["jaxaccel"], got["transformers"], got["onnxruntime"]
    r = result("bert-base (random) 8x128", B, {"jaxaccel": jt, "transformers": tt, "onnxruntime": ot},
               jw, jout, tout, oout, m.num_params)
    return with_bfloat16(r, got["bfloat16"], tout)


def jaxaccel_inputs(ids, mask):
    import jax.numpy as jnp

    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def bench_minilm(tmp: Path, repeats: int, n: int, batch: int) -> dict:
    import torch
    import transformers

    import jaxaccel
    from jaxaccel import default_models, encoder_tasks

    folder = default_models.default_encoder_path()
    texts = corpus(n)
    m = jaxaccel.load(folder)
    m16 = jaxaccel.load(folder, dtype="bfloat16")
    limit = encoder_tasks.max_length(m)
    packed, unpacked = encoder_tasks.EncodeStats(), encoder_tasks.EncodeStats()
    encoder_tasks.embed(m, texts, truncate=True, batch_size=batch, stats=packed)
    encoder_tasks.embed(m, texts, truncate=True, batch_size=batch, stats=unpacked, pack=False)
    tok = m.tokenizer
    pooled = Pooled(transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval())
    sess = export_onnx(pooled, tmp / "minilm.onnx")
    int8 = encoder_int8.functions(m, texts, batch, encoder_int8.ort_dynamic_int8(tmp / "minilm.onnx", tmp / "minilm-int8.onnx"),
                                  run_corpus, limit)
    got = timed({
        "jaxaccel": lambda: m.embed(texts, truncate=True, batch_size=batch),
        "unpacked": lambda: m.embed(texts, truncate=True, batch_size=batch, pack=False),
        "bfloat16": lambda: m16.embed(texts, truncate=True, batch_size=batch),
        "transformers": no_grad(lambda: run_corpus(tok, texts, batch, limit, 384,
                                                   lambda i, a: pooled(torch.tensor(i), torch.tensor(a)).numpy())),
        "onnxruntime": lambda: run_corpus(tok, texts, batch, limit, 384,
                                          lambda i, a: sess.run(None, {"input_ids": i, "attention_mask": a})[0]),
        **int8,
    }, repeats)
    (jw, jt, jout), (_, ut, _) = got["jaxaccel"], got["unpacked"]
    (_, tt, tout), (_, ot, oout) = got["transformers"], got["onnxruntime"]
    compiled = encoder_tasks.compiled_programs(m)
    r = result(f"all-MiniLM-L6-v2, {n} mixed sentences", n, {"jaxaccel": jt, "transformers": tt, "onnxruntime": ot},
               jw, jout, tout, oout, m.num_params)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=limit)["input_ids"]]
    r.update(jaxaccel_unpacked_s=ut, jaxaccel_unpacked_sentences_per_s=n / ut,
             tokens=packed.tokens, padded_tokens_packed=packed.padded_tokens,
             padded_tokens_unpacked=unpacked.padded_tokens,
             padded_tokens_per_batch_padding=per_batch_padding(lengths, batch), compiled_programs=compiled, bucket_shapes=len(encoder_tasks.length_buckets(limit)) * len(encoder_tasks.batch_shapes(batch)),
             tokens_mean=float(np.mean(lengths)), tokens_max=int(max(lengths)), batch=batch,
             int8=encoder_int8.result(got, n, tout))
    return with_bfloat16(r, got["bfloat16"], tout)


def result(name, sentences, secs, warm, jout, tout, oout, params) -> dict:
    sps = {k: sentences / v for k, v in secs.items()}
    return {"scenario": name, "sentences": sentences, "seconds": secs, "sentences_per_s": sps,
            "ratio_jaxaccel_vs": {k: sps["jaxaccel"] / sps[k] for k in ("transformers", "onnxruntime")},
            "jaxaccel_warmup_s": warm, "params": params,
            "min_cosine_jaxaccel_vs": {"transformers": min_cos(jout, tout), "onnxruntime": min_cos(jout, oout)}}


def with_bfloat16(r: dict, got, reference) -> dict:
    """Add the jaxaccel bfloat16 run (params and activations bfloat16; GEMMs on the CPU's bfloat16
    dot-product instructions with float32 sums, see layers._flat_dot) to a scenario's result:
    its speed over ONNX Runtime (float32) and its agreement with transformers float32."""
    warm, secs, out = got
    sps = r["sentences"] / secs
    r["bfloat16"] = {"seconds": secs, "sentences_per_s": sps, "warmup_s": warm,
                     "ratio_vs_onnxruntime": sps / r["sentences_per_s"]["onnxruntime"],
                     "min_cosine_vs_transformers_float32": min_cos(out, reference)}
    return r


ATTENTION_SHAPES = [  # label, B, T, heads, head size, text lengths drawn from [lo, hi]
    ("MiniLM rows 32x64, texts 8-40", 32, 64, 12, 32, (8, 40)),
    ("MiniLM packed 8x256, texts 16-128", 8, 256, 12, 32, (16, 128)),
    ("BERT-base 8x128, one text a row", 8, 128, 12, 64, (128, 128)),
]


GEMM_SHAPES = [(1024, 768, 3072), (1024, 3072, 768), (32, 640, 2048), (32, 640, 262144)]  # M, K, N


def bench_gemm(repeats: int) -> list[dict]:
    """XLA's CPU GEMM in GFLOP/s: float32, bfloat16 inputs with a float32 result (what
    layers._wide_sums asks for) and with a bfloat16 result, on BERT-base and Gemma 3 shapes; and
    the w8a8 dot (int8 x int8, per-token activations) through AQT / XLA and through w8a8.cc."""
    import jax
    import jax.numpy as jnp

    out = []
    for M, K, N in GEMM_SHAPES:
        rng = np.random.default_rng(0)
        x, w = jnp.asarray(rng.standard_normal((M, K)), jnp.float32), jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        f32_out = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        plain = jax.jit(jnp.dot)
        got = timed({"float32": lambda: plain(x, w).block_until_ready(),
                     "bf16 -> f32": lambda: f32_out(xb, wb).block_until_ready(),
                     "bf16 -> bf16": lambda: plain(xb, wb).block_until_ready(), **encoder_int8.gemm_functions(x, w)}, repeats)
        row = {"M": M, "K": K, "N": N, **{f"{k} GFLOP/s": 2 * M * K * N / v[1] / 1e9 for k, v in got.items()}}
        out.append(row)
        print("gemm " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return out


def bench_attention(repeats: int) -> list[dict]:
    """The attention core alone, float32: XLA's (layers.Attention._attend: every (query, key) pair
    of a row, the masked ones too) against the CPU kernel (only pairs inside a text)."""
    import jax
    import jax.numpy as jnp

    from jaxaccel import kernels
    from jaxaccel.config import ModelConfig
    from jaxaccel.layers import Attention

    if not kernels.load():
        raise SystemExit(f"the CPU kernels do not build here: {kernels.build._loaded.get('error')}")
    out = []
    for label, B, T, N, H, (lo, hi) in ATTENTION_SHAPES:
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
        seg = np.zeros((B, T), np.int32)
        for b in range(B):
            at, text = 0, 1
            while at < T:
                n = min(int(rng.integers(lo, hi + 1)), T - at)
                seg[b, at:at + n], at, text = text, at + n, text + 1
        cfg = ModelConfig(family="bert", vocab_size=8, hidden_size=N * H, intermediate_size=8, num_layers=1,
                          num_heads=N, num_kv_heads=N, head_dim=H, max_position_embeddings=T, causal=False,
                          absolute_positions=True)
        module = Attention(cfg, 0)
        xla = jax.jit(lambda q, k, v, s: module.apply({}, q, k, v, s, None, None, method=Attention._attend)[0])
        kernel = jax.jit(lambda q, k, v, s: kernels.attention(q, k, v, s, cfg.attn_scale))
        args = (q, k, v, jnp.asarray(seg))
        got = timed({"xla": lambda: xla(*args).block_until_ready(),
                     "kernel": lambda: kernel(*args).block_until_ready()}, repeats)
        real = seg > 0
        diff = float(np.abs(np.asarray(got["xla"][2]) - np.asarray(got["kernel"][2]))[real].max())
        pairs = int(sum((np.bincount(row[row > 0]) ** 2).sum() for row in seg))  # (query, key) pairs in texts
        xt, kt = got["xla"][1], got["kernel"][1]
        out.append({"shape": label, "B": B, "T": T, "heads": N, "head_dim": H, "xla_ms": xt * 1e3,
                    "kernel_ms": kt * 1e3, "speedup": xt / kt, "kernel_gflops": 4 * pairs * N * H / kt / 1e9,
                    "xla_gflops_all_pairs": 4 * B * T * T * N * H / xt / 1e9, "max_abs_diff": diff})
        print(f"attention {label}: XLA {xt * 1e3:.2f} ms, kernel {kt * 1e3:.2f} ms ({xt / kt:.1f}x)", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="bert-base,minilm",
                    help="comma list of: bert-base, minilm, attention (the attention core alone: XLA vs the CPU "
                         "kernel), gemm (XLA's GEMM in float32 and bfloat16)")
    ap.add_argument("--sentences", type=int, default=None, help="MiniLM corpus size (default 2000)")
    ap.add_argument("--batch", type=int, default=32, help="MiniLM batch size, all implementations (default 32)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs, median (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 sentences, 1 repeat")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/encoder.json)")
    args = ap.parse_args(argv)
    n = args.sentences or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    out_path = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    machine = {**machine_info(), "onnxruntime": onnxruntime.__version__}
    print(f"machine: {machine}\nload average before: {os.getloadavg()}", flush=True)
    results, attention, gemm = [], [], []
    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-enc-") as tmp:
        for s in args.scenarios.split(","):
            if s.strip() == "attention":
                attention = bench_attention(max(repeats, 10))
                continue
            if s.strip() == "gemm":
                gemm = bench_gemm(max(repeats, 10))
                continue
            if s.strip() == "bert-base":
                results.append(bench_fixed(Path(tmp), repeats, 8, 128))
            elif s.strip() == "minilm":
                results.append(bench_minilm(Path(tmp), repeats, n, args.batch))
            else:
                raise SystemExit(f"unknown scenario {s!r}")
            r = results[-1]
            print(f"{r['scenario']}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in r["sentences_per_s"].items()), flush=True)

    header = ["scenario", "jaxaccel sent/s", "transformers sent/s", "onnxruntime sent/s", "jax/pt", "jax/ort",
              "min cos pt", "min cos ort", "jax warm-up s", "jax bf16 sent/s", "bf16/ort", "bf16 min cos pt"]
    rows = [[r["scenario"], *(f"{r['sentences_per_s'][k]:.1f}" for k in ("jaxaccel", "transformers", "onnxruntime")),
             f"{r['ratio_jaxaccel_vs']['transformers']:.2f}", f"{r['ratio_jaxaccel_vs']['onnxruntime']:.2f}",
             f"{r['min_cosine_jaxaccel_vs']['transformers']:.6f}", f"{r['min_cosine_jaxaccel_vs']['onnxruntime']:.6f}",
             f"{r['jaxaccel_warmup_s']:.1f}", f"{r['bfloat16']['sentences_per_s']:.1f}",
             f"{r['bfloat16']['ratio_vs_onnxruntime']:.2f}",
             f"{r['bfloat16']['min_cosine_vs_transformers_float32']:.6f}"] for r in results]
    if results:
        print(format_table(header, rows))
    if any("int8" in r for r in results):
        print(format_table(*encoder_int8.table(results)))
    if attention:
        print(format_table(["attention core (float32)", "XLA ms", "kernel ms", "speedup",
                            "kernel GFLOP/s (pairs in texts)", "max |diff|"],
                           [[a["shape"], f"{a['xla_ms']:.2f}", f"{a['kernel_ms']:.2f}", f"{a['speedup']:.1f}",
                             f"{a['kernel_gflops']:.0f}", f"{a['max_abs_diff']:.1e}"] for a in attention]))
    if gemm:
        kinds = [k for k in gemm[0] if k.endswith("GFLOP/s")]
        print(format_table(["GEMM M x K x N", *kinds],
                           [[f"{g['M']}x{g['K']}x{g['N']}", *(f"{g[k]:.0f}" for k in kinds)] for g in gemm]))
    for r in results:
        if "compiled_programs" in r:
            print(f"{r['scenario']}: jaxaccel compiled {r['compiled_programs']} programs (bound "
                  f"{r['bucket_shapes']}); tokens mean {r['tokens_mean']:.1f}, max {r['tokens_max']}")
            print(f"  tokens computed: packed {r['padded_tokens_packed']:,}, bucketed {r['padded_tokens_unpacked']:,}, "
                  f"per-batch padding (transformers / ORT) {r['padded_tokens_per_batch_padding']:,}, real "
                  f"{r['tokens']:,}; jaxaccel without packing {r['jaxaccel_unpacked_sentences_per_s']:.1f} sent/s")
    doc = {"benchmark": "encoder", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine,
           "settings": {"repeats": repeats, "statistic": "median", "dtype": "float32 (and bfloat16: 'bfloat16')", "torch_num_threads": threads,
                        "transformers_attn": "eager (module default)", "quick": args.quick},
           "load_average_after": list(os.getloadavg()), "results": results, "attention": attention,
           "gemm": gemm}
    write_json(doc, out_path)
    return doc


if __name__ == "__main__":
    main()
