"""int4 weights in the prefill (int4.cc's blocked GEMM, more than MAX_ROWS rows): equal to the
dequantized dot with x rounded to int16 per 64-block as in the decode steps, equal to the decode
path row for row, and a tiny int4 model's prefill and greedy tokens equal through the kernel and
through XLA. The decode rows' own tests: test_kernels.py."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from jaxaccel import generation, kernels
from jaxaccel.config import ModelConfig
from jaxaccel.quant_math import dequantize, pack_int4


@pytest.fixture(scope="module")
def built():
    assert kernels.load(), f"the CPU kernel must build on the test machine: {kernels.build._loaded.get('error')}"


def _kernel(x, packed, scale, zero):
    """int4.cc called directly (whatever `int4_wants` routes on this build: the portable build's
    kernel takes prefill rows too, through its decode loop)."""
    out = jax.ShapeDtypeStruct((x.shape[0], packed.shape[0]), jnp.float32)
    return np.asarray(jax.jit(jax.ffi.ffi_call("jaxaccel_matvec_int4", out))(x, packed, scale, zero))


def _case(M, K, N, gs, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    scale = rng.uniform(0.005, 0.05, (N, K // gs)).astype(np.float32)
    zero = rng.normal(0, 0.2, (N, K // gs)).astype(np.float32)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)  # rows of unequal size
    return x, q, scale, zero


def _rounded_reference(x, q, scale, zero, levels=32767):
    """In float64: x rounded to int16 per 64-block (s = max |x| / 32767, ties to even; `levels`
    instead of 32767 for other codes) times the codes' part of W, plus x itself times the zeros'
    part, as the kernel computes it."""
    N, K = q.shape
    gs = K // scale.shape[1]
    xb = x.reshape(x.shape[0], -1, 64)
    s = np.max(np.abs(xb), axis=2, keepdims=True) / np.float32(levels)
    r = (np.where(s > 0, np.rint(xb / np.where(s > 0, s, np.float32(1))), 0) * s.astype(np.float64)).reshape(x.shape)
    codes = (q.reshape(N, -1, gs) * scale[:, :, None].astype(np.float64)).reshape(N, K)
    return r @ codes.T + x.astype(np.float64) @ np.repeat(zero.astype(np.float64), gs, axis=1).T


# rows 9..512 (partial vector groups and row blocks), odd N (partial weight tiles), K of 1 to 16
# blocks, groups of 32 / 64 / 128 / 256 inputs and one group for the whole row
@pytest.mark.parametrize("M,K,N,gs", [(9, 128, 33, 32), (17, 640, 70, 64), (40, 256, 301, 128), (100, 192, 7, 32),
                                      (512, 640, 129, 32), (33, 512, 61, 512), (250, 1024, 45, 256), (129, 64, 5, 64)])
def test_int4_prefill_kernel_equals_rounded_reference_and_decode_rows(built, M, K, N, gs):
    x, q, scale, zero = _case(M, K, N, gs, M * K + N + gs)
    packed = pack_int4(jnp.asarray(q))
    got = _kernel(x, packed, scale, zero)
    assert got.shape == (M, N) and got.dtype == np.float32
    ref = _rounded_reference(x, q, scale, zero)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-4 * np.abs(ref).max())
    exact = x.astype(np.float64) @ np.asarray(dequantize(jnp.asarray(q), scale, zero), np.float64).T
    assert np.max(np.abs(got - exact)) <= 2e-4 * np.abs(exact).max()  # x's int16 rounding: ~2^-16 of a block's max
    # the decode steps' path (8 rows a call): the same computation, with x rounded to int8 instead
    # of int16 on the avx2 build (kernels.int4_decode_x_levels), so equal to its own reference
    decode = np.concatenate([_kernel(x[i:i + 8], packed, scale, zero) for i in range(0, M, 8)])
    levels = kernels.int4_decode_x_levels()
    np.testing.assert_allclose(decode, _rounded_reference(x, q, scale, zero, levels), rtol=2e-5,
                               atol=1e-4 * np.abs(ref).max())
    if levels == 32767:  # the same rounding as the prefill's: equal up to float ordering
        np.testing.assert_allclose(got, decode, rtol=2e-5, atol=1e-5 * np.abs(ref).max())


def test_int4_prefill_kernel_propagates_nan_to_its_own_row_only(built):
    x, q, scale, zero = _case(20, 128, 50, 32, 7)
    x[3, 70], x[11, 5] = np.nan, np.inf
    got = _kernel(x, pack_int4(jnp.asarray(q)), scale, zero)
    assert np.isnan(got[[3, 11]]).all() and np.isfinite(np.delete(got, [3, 11], axis=0)).all()


def test_int4_prefill_rows_go_to_the_kernel_on_int16_builds_only(built):
    """Up to INT4_PREFILL_MAX_ROWS rows on VNNI builds, AVX2_PREFILL_MAX_ROWS on AVX2 (XLA's
    float32 GEMM on the dequantized weight takes more), none past MAX_ROWS on the portable build."""
    packed, s = jnp.zeros((10, 64), jnp.uint8), jnp.ones((10, 4))
    int16 = kernels.int4_path() in ("vnni", "avx2")
    limit = kernels.INT4_PREFILL_MAX_ROWS if kernels.int4_path() == "vnni" else kernels.AVX2_PREFILL_MAX_ROWS
    for M in (kernels.MAX_ROWS + 1, 40, limit):
        assert kernels.int4_wants(jnp.ones((M, 128)), packed, s, s) == int16
    assert not kernels.int4_wants(jnp.ones((limit + 1, 128)), packed, s, s)  # XLA's GEMM
    assert kernels.int4_wants(jnp.ones((kernels.MAX_ROWS, 128)), packed, s, s)  # decode rows: every build
    assert not kernels.int4_wants(jnp.ones((40, 128)), packed, jnp.ones((10, 8)), jnp.ones((10, 8)))  # groups of 16
    with pytest.raises(Exception, match=r"needs x \[M <= 512, K\]"):
        _kernel(np.ones((513, 128), np.float32), packed, np.ones((10, 4), np.float32), np.ones((10, 4), np.float32))


@pytest.fixture(scope="module")
def int4_model(built):
    if kernels.int4_path() not in ("vnni", "avx2"):
        pytest.skip("prefill rows of int4 weights go to XLA on this build")
    # K of every projection a multiple of 64; v_proj / down_proj stay int8 (the int4 defaults),
    # so the prefill also passes int8's prefill rows
    cfg = ModelConfig(family="llama", vocab_size=211, hidden_size=192, intermediate_size=320, num_layers=1,
                      num_heads=3, num_kv_heads=1, head_dim=64, max_position_embeddings=600)
    return jaxaccel.init_random(cfg, seed=11, dtype="float32").quantize(jaxaccel.QuantConfig(mode="int4"))


def test_int4_model_prefill_logits_through_the_kernel_equal_xla(int4_model):
    """Prefill logits (31 tokens x 2 rows: 62-row dots, within every int16 build's row limit)
    through the kernels agree with XLA's dequantized dots to 1e-3 of the logits' range: they
    differ by x's int16 rounding only (2^-16 of a block's largest |x| per input)."""
    from jaxaccel.models import registry

    ids = jnp.asarray(np.random.default_rng(0).integers(1, 211, (2, 31)), jnp.int32)

    def prefill_logits(choice):
        module = registry.build(int4_model.config, int4_model.dtype, dot_general_cls=int4_model.dot_general_cls,
                                kernels=choice)
        fn = jax.jit(lambda p, t: module.apply({"params": p}, t).logits)
        return np.asarray(fn(int4_model.params, ids)), fn.lower(int4_model.params, ids).as_text()

    ref, plain = prefill_logits(kernels.XLA)
    got, text = prefill_logits(kernels.KernelChoice(decode=True))
    assert "jaxaccel_matvec_int4" in text and "jaxaccel_matvec_int4" not in plain
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3 * (ref.max() - ref.min()))
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


# 2 rows of prompts bucketed to 32 tokens (64-row dots), and to 256 (512 rows: INT4_PREFILL_MAX_ROWS on
# VNNI builds; XLA's GEMM on AVX2 ones)
@pytest.mark.parametrize("lengths", [(20, 30), pytest.param((40, 200), marks=pytest.mark.slow)])
def test_int4_model_greedy_tokens_through_the_kernel_equal_xla(int4_model, lengths, monkeypatch):
    rng = np.random.default_rng(sum(lengths))
    prompts = [rng.integers(1, 211, n).tolist() for n in lengths]

    def greedy(use_kernel):
        monkeypatch.setattr(kernels, "usable", lambda m: use_kernel)
        fresh = dataclasses.replace(int4_model)  # a new Model: no engine (and programs) cached from before
        return [list(r) for r in generation.generate_tokens(fresh, prompts, max_new_tokens=12)]

    assert greedy(True) == greedy(False)


@pytest.mark.slow  # rebuilds the kernels per tier (about 80 s each on 2 cores)
@pytest.mark.parametrize("tier", ["avx2", "generic"])
def test_int4_prefill_kernel_tests_pass_on_every_isa_tier_this_cpu_runs(tmp_path, tier, monkeypatch):
    """The kernel tests above rerun with the kernels built for a lower ISA tier (JAXACCEL_CPU_ISA):
    AVX2's GEMM and the portable build's loop are checked on an AVX-512 machine too."""
    from mesh_util import run_python

    monkeypatch.setenv(kernels.ISA_ENV, tier)
    try:
        kernels.isa_tier()
    except ValueError:
        pytest.skip(f"this CPU cannot run the {tier} tier")
    env = {kernels.ISA_ENV: tier, "JAXACCEL_CACHE": str(tmp_path)}
    proc = run_python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel and not tier", str(Path(__file__)),
                      devices=1, env=env, timeout=1200)
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
    path = run_python("-c", "from jaxaccel import kernels; print('int4 path', kernels.int4_path())", devices=1, env=env)
    assert f"int4 path {'avx2' if tier == 'avx2' else 'portable'}" in path.stdout
