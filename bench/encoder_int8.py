"""Dynamic-range int8 rows of the encoder benchmark (`bench/encoder.py`, MiniLM corpus scenario):
jaxaccel w8a8 (int8 weights per channel x activations quantized per token at run time, through
the int8 GEMM kernel `jaxaccel/kernels/w8a8.cc`) against ONNX Runtime's dynamic quantization of
the same exported model (`onnxruntime.quantization.quantize_dynamic`: int8 weights per channel,
activations quantized at run time), timed in the same rounds as the float32 rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

JAX, ORT = "jaxaccel w8a8", "onnxruntime int8"


def ort_dynamic_int8(float_onnx: Path, out: Path):
    """ONNX Runtime's dynamic-range int8 model of `float_onnx`: MatMul weights QInt8 per output
    channel (ORT's `per_channel`), activations quantized per call; CPUExecutionProvider."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_onnx), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def functions(model, texts, batch: int, ort_session, run_corpus, limit: int) -> dict:
    """name -> the timed call: the w8a8 model's `embed` and the ORT int8 session over the same
    length-sorted batches the float32 ORT row gets."""
    from jaxaccel import QuantConfig

    wq = model.quantize(QuantConfig(mode="w8a8"))
    return {JAX: lambda: wq.embed(texts, truncate=True, batch_size=batch),
            ORT: lambda: run_corpus(model.tokenizer, texts, batch, limit, model.config.hidden_size,
                                    lambda i, a: ort_session.run(None, {"input_ids": i, "attention_mask": a})[0])}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def result(got: dict, sentences: int, float32: np.ndarray) -> dict:
    """The two rows from `timed`'s results: sentences/s, jaxaccel over ORT int8, and each one's
    min / mean cosine with the float32 embeddings (transformers float32, the reference row)."""
    out = {}
    for name in (JAX, ORT):
        warm, secs, emb = got[name]
        cos = cosines(np.asarray(emb, np.float32), float32)
        out[name] = {"seconds": secs, "warmup_s": warm, "sentences_per_s": sentences / secs,
                     "min_cosine_vs_float32": float(cos.min()), "mean_cosine_vs_float32": float(cos.mean())}
    out["ratio_jaxaccel_w8a8_vs_onnxruntime_int8"] = out[JAX]["sentences_per_s"] / out[ORT]["sentences_per_s"]
    return out


def table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the int8 comparison for the scenarios that ran it."""
    header = ["scenario (dynamic int8)", "jax w8a8 sent/s", "ort int8 sent/s", "w8a8/ort int8", "w8a8/ort f32",
              "w8a8 min cos", "w8a8 mean cos", "ort int8 min cos", "ort int8 mean cos"]
    rows = []
    for r in results:
        q = r.get("int8")
        if not q:
            continue
        j, o = q[JAX], q[ORT]
        rows.append([r["scenario"], f"{j['sentences_per_s']:.1f}", f"{o['sentences_per_s']:.1f}",
                     f"{q['ratio_jaxaccel_w8a8_vs_onnxruntime_int8']:.2f}",
                     f"{j['sentences_per_s'] / r['sentences_per_s']['onnxruntime']:.2f}",
                     f"{j['min_cosine_vs_float32']:.5f}", f"{j['mean_cosine_vs_float32']:.5f}",
                     f"{o['min_cosine_vs_float32']:.5f}", f"{o['mean_cosine_vs_float32']:.5f}"])
    return header, rows


def gemm_functions(x, w) -> dict:
    """One GEMM shape's w8a8 dot (x [M, K] float32, w [K, N] float32 quantized per output
    channel), both ways: AQT's dot as XLA compiles it, and the int8 GEMM kernel (same numerics)."""
    import jax

    from jaxaccel import quant
    from jaxaccel.kernels import w8a8
    from jaxaccel.quant_math import quantize

    q, s = quantize(w.T, 8)
    aqt, kernel = jax.jit(quant._aqt_dot), jax.jit(w8a8.dot)
    return {"w8a8 AQT/XLA": lambda: aqt(x, q, s).block_until_ready(),
            "w8a8 kernel": lambda: kernel(x, q, s).block_until_ready()}
