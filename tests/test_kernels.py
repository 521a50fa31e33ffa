"""The CPU decode matvec (jaxaccel/kernels): equal to XLA's dot, used by generation, and a clean
fallback to XLA when the kernels cannot be built (the attention kernel: test_attention_kernel.py)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from jaxaccel import engine, generation, kernels
from jaxaccel.config import ModelConfig


@pytest.fixture(scope="module")
def built():
    assert kernels.load(), f"the CPU kernel must build on the test machine: {kernels.build._loaded.get('error')}"


def _reference(x, w, axis, scale=None):
    w = np.asarray(w.astype(jnp.float32), np.float64)
    if scale is not None:  # int8 [N, K] with scales [N, G]
        n, k = w.shape
        g = scale.shape[1]
        w = (w.reshape(n, g, k // g) * np.asarray(scale, np.float64)[:, :, None]).reshape(n, k)
    return np.asarray(x, np.float64) @ (w if axis == 0 else w.T)


# K and N: odd sizes (scalar tails), sizes over the 128 KB hand-off threshold (pool threads join)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("M,K,N", [(1, 37, 50), (3, 256, 1000), (8, 640, 2048), (5, 1030, 77)])
def test_float_matvec_equals_dot(built, dtype, axis, M, K, N):
    rng = np.random.default_rng(M * K + N)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, N) if axis == 0 else (N, K)), dtype)
    got = np.asarray(jax.jit(kernels.matvec, static_argnums=2)(x, w, axis))
    assert got.shape == (M, N) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(x, w, axis), rtol=1e-5, atol=1e-4)


def _activation_block(M, K, G):
    """The int16 block the int8 kernel rounds x to (matvec.cc: the largest of 128 / 64 / 32
    dividing the weight's group size, except for 5..8 rows unless K >= 1024 and the block >= 64),
    0 where it keeps float32 x."""
    path = kernels.int8_path()  # what this machine's build does (AVX-512 VNNI, AVX2, or widening)
    if path == "float":
        return 0
    block = next((b for b in (128, 64, 32) if (K // G) % b == 0), 0)
    if path == "vnni" and 4 < M <= 8 and (K < 1024 or block < 64):
        return 0  # 5..8 rows on VNNI: long rows only
    return block


def _int16_rounded(x, block, levels=32767):
    """x as the kernel's VNNI path rounds it: per block, s = max |x| / 32767 (float32; `levels`
    instead of 32767 for other codes) and x / s rounded to the nearest integer (ties to even);
    returns (s * q as float64, s per input)."""
    xb = np.asarray(x, np.float32).reshape(x.shape[0], -1, block)
    s = np.max(np.abs(xb), axis=2, keepdims=True) / np.float32(levels)
    q = np.where(s > 0, np.rint(xb / np.where(s > 0, s, np.float32(1))), 0)
    return (q * s.astype(np.float64)).reshape(x.shape), np.broadcast_to(s, xb.shape).reshape(x.shape)


# int4 (int4.cc): decode rows 1-8 (groups of 4 rows and a remainder), groups of 32 / 64 / 128
# inputs, odd N, weights over and under the hand-off threshold
@pytest.mark.parametrize("M,K,N,gs", [(1, 640, 1024, 32), (3, 2048, 640, 32), (8, 128, 70, 64), (5, 640, 33, 128),
                                      (2, 192, 5, 32), (4, 1024, 2049, 32), (7, 256, 300, 256)])
def test_int4_matvec_equals_dequantized_dot(built, M, K, N, gs):
    """The int4 kernel rounds x per block of 64 inputs for the codes' sums (to int16 as the int8
    kernel does, to int8 on the avx2 build: `kernels.int4_decode_x_levels`) and multiplies the
    zeros by x's float sums: equal to that computation in float64, and within the bound the
    rounding allows of the dequantized float dot."""
    from jaxaccel.quant_math import dequantize, pack_int4

    rng = np.random.default_rng(M + K + N + gs)
    G = K // gs
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    scale = rng.uniform(0.005, 0.05, (N, G)).astype(np.float32)
    zero = rng.normal(0, 0.2, (N, G)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    got = np.asarray(jax.jit(lambda *a: kernels.dot_int4(*a, jnp.float32))(x, pack_int4(jnp.asarray(q)), scale, zero))
    assert got.shape == (M, N) and got.dtype == np.float32
    codes = (q.reshape(N, G, gs) * scale[:, :, None].astype(np.float64)).reshape(N, K)  # q * scale
    zeros = np.repeat(zero.astype(np.float64), gs, axis=1)  # [N, K]
    rounded, s = _int16_rounded(x, 64, kernels.int4_decode_x_levels())
    np.testing.assert_allclose(got, rounded @ codes.T + x.astype(np.float64) @ zeros.T, rtol=1e-5, atol=1e-4)
    exact = x.astype(np.float64) @ np.asarray(dequantize(jnp.asarray(q), scale, zero), np.float64).T
    bound = 0.5 * s.astype(np.float64) @ np.abs(codes).T  # the most x's rounding can move the sums
    assert np.all(np.abs(got - exact) <= bound + 1e-4 + 1e-5 * np.abs(exact))


def test_int4_kernel_takes_decode_rows_of_its_layout_only_and_refuses_bad_shapes(built):
    x = jnp.ones((2, 128))
    packed, s = jnp.zeros((10, 64), jnp.uint8), jnp.ones((10, 4))
    assert kernels.int4_wants(x, packed, s, s)
    prefill = kernels.int4_wants(jnp.ones((kernels.MAX_ROWS + 1, 128)), packed, s, s)
    assert prefill == (kernels.int4_path() in ("vnni", "avx2"))  # else XLA's GEMM (test_int4_prefill.py)
    assert not kernels.int4_wants(jnp.ones((2, 96)), jnp.zeros((10, 48), jnp.uint8), s, s)  # K not a multiple of 64
    assert not kernels.int4_wants(x, packed, jnp.ones((10, 8)), jnp.ones((10, 8)))  # groups of 16
    assert not kernels.int4_wants(x, packed, s, None)
    with pytest.raises(Exception, match="K must be a multiple of 64"):
        jax.jit(lambda x, p, s: jax.ffi.ffi_call("jaxaccel_matvec_int4", jax.ShapeDtypeStruct((2, 10), jnp.float32))(
            x, p, s, s))(jnp.ones((2, 96)), jnp.zeros((10, 48), jnp.uint8), jnp.ones((10, 3))).block_until_ready()


@pytest.mark.parametrize("M,K,N,G", [(1, 640, 2048, 1), (1, 640, 4096, 20), (8, 256, 512, 8), (5, 320, 300, 10),
                                     (2, 96, 33, 4), (3, 70, 40, 2), (2, 256, 300, 2), (4, 192, 64, 3),
                                     (3, 96, 100, 1), (9, 640, 300, 1), (37, 256, 500, 8), (256, 640, 64, 20),
                                     (14, 512, 70, 2), (11, 192, 63, 3),
                                     (6, 1024, 100, 4), (8, 2048, 33, 1)])
def test_int8_matvec_with_scales_equals_dequantized_dot(built, M, K, N, G):
    """Up to 4 rows (decode) and more than 8 (prefill: groups of 4 rows, any remainder), on a CPU
    with AVX-512 VNNI, the kernel rounds x to int16 per block (2^-16 of the block's largest |x|):
    equal to the dot of that rounded x, and within the bound that rounding allows of the float
    dot. Otherwise equal to the float dot. Builds without VNNI (AVX2 and portable tiers) refuse
    more than 16 rows clearly; `kernels.wants` never sends them such rows."""
    rng = np.random.default_rng(K + N + G)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    q = jnp.asarray(rng.integers(-127, 128, (N, K)), jnp.int8)
    scale = jnp.asarray(rng.random((N, G)) * 0.02, jnp.float32)
    matvec = jax.jit(lambda x, q, s: kernels.matvec(x, q, 1, s))
    if M > 2 * kernels.MAX_ROWS and not _activation_block(M, K, G):
        assert not kernels.wants(x, q, scale)
        with pytest.raises(Exception, match="more than 16 rows need int8 weights.*AVX2 build"):
            matvec(x, q, scale).block_until_ready()
        return
    got = np.asarray(matvec(x, q, scale))
    exact = _reference(x, q, 1, scale)
    block = _activation_block(M, K, G)
    if not block:
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
        return
    rounded, s = _int16_rounded(x, block)
    np.testing.assert_allclose(got, _reference(rounded, q, 1, scale), rtol=1e-5, atol=1e-4)
    w = np.abs(_reference(np.eye(K), q, 1, scale))  # |dequantized weight| [K, N]
    bound = 0.5 * s.astype(np.float64) @ w  # sum_k |w| * (s / 2), the most the rounding can move
    assert np.all(np.abs(got - exact) <= bound + 1e-4 + 1e-5 * np.abs(exact))
    # really the rounded path: further from the float dot than from the rounded one
    assert np.abs(got - exact).max() > 10 * np.abs(got - _reference(rounded, q, 1, scale)).max()


@pytest.mark.parametrize("M", [1, 3, 8, 37])
def test_int8_matvec_many_equals_one_call_per_weight(built, M):
    """One call for several int8 weights on the same x (a layer's q / k / v): each output equals
    the kernel's call for that weight alone bit for bit, whatever the weights' row counts, group
    counts and sizes on either side of the 128 KB hand-off threshold (each is cut into the chunks
    its own call would cut). 37 rows: the prefill's, on builds that take them."""
    rng = np.random.default_rng(M)
    K = 640
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    weights = [(jnp.asarray(rng.integers(-127, 128, (n, K)), jnp.int8), jnp.asarray(rng.random((n, g)) * 0.02, jnp.float32))
               for n, g in [(1024, 1), (7, 20), (256, 5), (333, 1), (2048, 20)]]
    if not all(kernels.wants(x, w, s) for w, s in weights):
        assert M > kernels.MAX_ROWS and kernels.dot_many(x, weights, jnp.float32) is None
        return
    many = jax.jit(kernels.matvec_many)(x, weights)
    one = jax.jit(lambda x, w, s: kernels.matvec(x, w, 1, s))
    for (w, s), got in zip(weights, many):
        assert got.shape == (M, w.shape[0])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(one(x, w, s)))


def test_int8_matvec_many_refused_for_other_weights(built):
    """dot_many takes only int8 weights with scales that the kernel takes one by one; the kernel
    refuses anything else with a message."""
    x = jnp.ones((1, 64), jnp.float32)
    q, s = jnp.ones((48, 64), jnp.int8), jnp.ones((48, 2), jnp.float32)
    assert kernels.dot_many(x, [(q, s)], jnp.float32) is None  # one weight: the plain call
    assert kernels.dot_many(x, [(q, s), (q.astype(jnp.float32), s)], jnp.float32) is None
    call = lambda outs: jax.ffi.ffi_call("jaxaccel_matvec_scaled_many", [jax.ShapeDtypeStruct((1, 48), jnp.float32)] * outs)
    with pytest.raises(Exception, match=r"\(weight, scale\) pairs"):
        jax.jit(lambda x, q, s: call(2)(x, q, s))(x, q, s)[0].block_until_ready()
    with pytest.raises(Exception, match=r"int8 \[N, K\] with scales \[N, G\]"):
        jax.jit(lambda x, q, s: call(1)(x, q, s))(x, q.astype(jnp.float32), s)[0].block_until_ready()
    with pytest.raises(Exception, match="do not match"):
        jax.jit(lambda x, q, s: call(1)(x, q, s))(jnp.ones((1, 32)), q, s)[0].block_until_ready()


def test_fused_projections_give_the_same_decode_logits(built):
    """With int8 weights, a decode program multiplies q / k / v and gate / up in one kernel call
    each (`KernelChoice.fuse_projections`), and its logits equal one call per projection bit for bit."""
    from jaxaccel.kv_cache import init_cache
    from jaxaccel.models import registry
    from jaxaccel import quant

    model = _tiny().quantize(jaxaccel.QuantConfig(mode="int8"))
    cfg, qcfg = model.config, model.quant
    params = model.params
    cache = init_cache(cfg, 2, 16, jnp.float32)
    tokens = jnp.asarray([[3], [7]], jnp.int32)
    texts, logits = {}, {}
    for fuse in (True, False):
        module = registry.build(cfg, "float32", dot_general_cls=quant.dot_general_cls(qcfg, serving=True),
                                kernels=kernels.KernelChoice(decode=True, fuse_projections=fuse))
        step = jax.jit(lambda p, t, c: module.apply({"params": p}, t, cache=c).logits)
        texts[fuse] = step.lower(params, tokens, cache).as_text()
        logits[fuse] = np.asarray(step(params, tokens, cache))
    # per layer: q / k / v in one call and gate / up in one
    assert texts[True].count("jaxaccel_matvec_scaled_many") == 2 * cfg.num_layers
    assert "jaxaccel_matvec_scaled_many" not in texts[False]
    np.testing.assert_array_equal(logits[True], logits[False])


def test_int8_matvec_propagates_nan_and_infinity(built):
    """A NaN / infinite input makes its row NaN on the rounded path too (never a finite guess)."""
    q = jnp.asarray(np.random.default_rng(0).integers(-127, 128, (300, 256)), jnp.int8)
    s = jnp.full((300, 2), 0.01, jnp.float32)
    for bad in (np.nan, np.inf):
        x = np.ones((2, 256), np.float32)
        x[1, 5] = bad
        got = np.asarray(jax.jit(lambda x, q, s: kernels.matvec(x, q, 1, s))(jnp.asarray(x), q, s))
        assert np.isfinite(got[0]).all() and not np.isfinite(got[1]).any()


@pytest.mark.parametrize("axis", [0, 1])
def test_same_input_gives_the_same_bits(built, axis):
    """Threads take chunks in any order; the sums must not depend on it (seeded sampling and
    greedy near-ties stay reproducible)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 4096)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4096, 256) if axis == 0 else (256, 4096)), jnp.float32)
    f = jax.jit(kernels.matvec, static_argnums=2)
    first = np.asarray(f(x, w, axis))
    for _ in range(100):
        np.testing.assert_array_equal(np.asarray(f(x, w, axis)), first)


GENERIC_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jaxaccel import kernels
assert kernels.load(), kernels.build._loaded
assert kernels.int8_path() == "float"  # the portable build widens int8 (no int16 rounding)
rng = np.random.default_rng(0)
for M, K, N, G in [(1, 640, 300, 20), (4, 256, 512, 8), (3, 70, 40, 2)]:
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    q = jnp.asarray(rng.integers(-127, 128, (N, K)), jnp.int8)
    s = jnp.asarray(rng.random((N, G)) * 0.02, jnp.float32)
    ref = (np.asarray(q, np.float64).reshape(N, G, K // G) * np.asarray(s, np.float64)[:, :, None]).reshape(N, K)
    np.testing.assert_allclose(np.asarray(kernels.matvec(x, q, 1, s)), np.asarray(x, np.float64) @ ref.T, rtol=1e-5, atol=1e-4)
    for dt in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(rng.standard_normal((K, N)), dt)
        wf = np.asarray(w.astype(jnp.float32), np.float64)
        np.testing.assert_allclose(np.asarray(kernels.matvec(x, w, 0)), np.asarray(x, np.float64) @ wf, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(kernels.matvec(x, w.T, 1)), np.asarray(x, np.float64) @ wf, rtol=1e-5, atol=1e-4)
from test_attention_kernel import reference
q, k, v = (rng.standard_normal((2, 20, 2, 32)).astype(np.float32) for _ in range(3))  # H = 32: AVX-512 blocks elsewhere
seg = np.array([[1] * 7 + [2] * 13, [1] * 15 + [0] * 5], np.int32)
got = np.asarray(kernels.attention(*map(jnp.asarray, (q, k, v, seg)), 0.2))
np.testing.assert_allclose(got, reference(q, k, v, seg, 0.2), rtol=1e-5, atol=2e-6)
try:  # prefill-sized rows are the VNNI path's only
    kernels.matvec(jnp.ones((17, 64)), jnp.ones((48, 64), jnp.int8), 1, jnp.ones((48, 2))).block_until_ready()
    raise SystemExit("17 rows were accepted")
except Exception as e:
    assert "more than 16 rows" in str(e), e
print("ok")
"""


INT8_GENERATE = """
import os, pathlib, jaxaccel
from jaxaccel import QuantConfig, generation, kernels, program_cache
from jaxaccel.config import ModelConfig
program_cache.set_folder(pathlib.Path(os.environ["JAXACCEL_CACHE"]) / "programs")  # saved traces, as the CLI has them
m = jaxaccel.init_random(ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128), seed=0)
m = m.quantize(QuantConfig(mode="int8"))
out = generation.generate_tokens(m, [list(range(3, 23))], max_new_tokens=4)  # a 32-row prefill
assert len(out[0]) == 4 and kernels.usable(m), out
print("int8 path", kernels.int8_path())
"""


@pytest.mark.skipif(not kernels.int8_int16(), reason="needs an AVX-512 VNNI or AVX2 CPU to build the two kinds")
@pytest.mark.slow  # tens of seconds: CI's slow run
def test_saved_generation_programs_are_kept_apart_per_kernel_build(tmp_path):
    """An int16-path build (VNNI, AVX2) sends the int8 prefill's rows to the kernel, which a portable build refuses:
    a generation program saved by the one must not be reused by the other (a shared cache folder,
    e.g. a home directory on several machines)."""
    from mesh_util import run_python

    env = {"JAXACCEL_CACHE": str(tmp_path)}
    assert f"int8 path {kernels.int8_path()}" in run_python("-c", INT8_GENERATE, devices=1, env=env).stdout
    generic = run_python("-c", INT8_GENERATE, devices=1, env={**env, kernels.FLAGS_ENV: "-DJAXACCEL_GENERIC"})
    assert "int8 path float" in generic.stdout


def test_portable_build_without_avx512_code_is_equal_too(tmp_path):
    """The code for CPUs without AVX-512 (this machine has it, so build it on purpose)."""
    from mesh_util import run_python

    proc = run_python("-c", GENERIC_CHECK, devices=1, env={kernels.FLAGS_ENV: "-DJAXACCEL_GENERIC",
                                                            "JAXACCEL_CACHE": str(tmp_path)})
    assert "ok" in proc.stdout
    assert len(list((tmp_path / "kernels").glob("cpu-*.so"))) == 1


def _runnable_tiers():
    tiers, before = [], os.environ.get(kernels.ISA_ENV)
    for tier in kernels.ISA_TIERS:
        try:
            os.environ[kernels.ISA_ENV] = tier
            kernels.isa_tier()
            tiers.append(tier)
        except ValueError:
            pass
    if before is None:
        os.environ.pop(kernels.ISA_ENV, None)
    else:
        os.environ[kernels.ISA_ENV] = before  # a tier the whole run was asked for stays asked for
    return tiers


@pytest.mark.slow  # rebuilds the kernels per tier (about 80 s each on 2 cores)
@pytest.mark.parametrize("tier", [t for t in _runnable_tiers() if t != "native"])
def test_kernel_tests_pass_on_every_isa_tier_this_cpu_runs(tmp_path, tier):
    """The kernel equality tests, rerun in a process whose kernels are built for a lower ISA tier
    (JAXACCEL_CPU_ISA): the AVX2 and portable code paths are checked on an AVX-512 machine too."""
    from mesh_util import run_python

    proc = run_python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "equal or refused or same_input or nan",
                      str(Path(__file__).parent / "test_kernels.py"), str(Path(__file__).parent / "test_attention_kernel.py"),
                      devices=1, env={kernels.ISA_ENV: tier, "JAXACCEL_CACHE": str(tmp_path)}, timeout=1200)
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
    path = run_python("-c", "from jaxaccel import kernels; print('int8 path', kernels.int8_path())", devices=1,
                      env={kernels.ISA_ENV: tier, "JAXACCEL_CACHE": str(tmp_path)})
    # no AVX-512 code in these tiers: AVX2's integer path, or widening to float32
    assert f"int8 path {'avx2' if tier == 'avx2' else 'float'}" in path.stdout
    assert len(list((tmp_path / "kernels").glob("cpu-*.so"))) == 1


def test_unknown_or_unrunnable_isa_tier_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "avx1024")
    with pytest.raises(ValueError, match="JAXACCEL_CPU_ISA='avx1024' is not a tier; choose one of native, avx2, generic"):
        kernels.isa_tier()
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    monkeypatch.setattr(kernels.build, "cpu_flags", lambda: {"sse4_2", "popcnt"})
    with pytest.raises(ValueError, match=r"needs CPU features this CPU lacks \(avx2, fma, bmi2, f16c, movbe\)"):
        kernels.isa_tier()


@pytest.mark.slow  # tens of seconds: CI's slow run
def test_damaged_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A truncated or emptied cached library (it crashed every run with SIGBUS) is rebuilt, with
    a warning, and the next process loads the good one."""
    from mesh_util import run_python

    check = "from jaxaccel import kernels\nassert kernels.load(), kernels.build._loaded\nprint('built', kernels.build._loaded['path'])"
    env = {"JAXACCEL_CACHE": str(tmp_path)}
    run_python("-c", check, devices=1, env=env)
    lib = next((tmp_path / "kernels").glob("cpu-*.so"))
    good = lib.read_bytes()
    assert kernels._verified(lib)
    for damage in (good[: len(good) // 2], b""):
        lib.write_bytes(damage)
        proc = run_python("-c", check, devices=1, env=env)
        assert "does not match its checksum" in proc.stderr and kernels._verified(lib) and lib.stat().st_size > 0


def test_bad_shapes_are_refused_clearly(built):
    x = jnp.ones((1, 8), jnp.float32)
    with pytest.raises(Exception, match="do not match"):
        jax.jit(lambda x, w: kernels.matvec(x, w, 0))(x, jnp.ones((9, 4), jnp.float32)).block_until_ready()
    with pytest.raises(Exception, match="int8 weights need"):
        jax.jit(lambda x, w: kernels.matvec(x, w, 0))(x, jnp.ones((8, 4), jnp.int8)).block_until_ready()
    with pytest.raises(Exception, match="more than 16 rows need int8 weights"):
        jax.jit(lambda x, w: kernels.matvec(x, w, 0))(jnp.ones((17, 8)), jnp.ones((8, 4))).block_until_ready()
    with pytest.raises(Exception, match="weights must be float32, bfloat16 or int8"):
        jax.jit(lambda x, w: kernels.matvec(x, w, 0))(x, jnp.ones((8, 4), jnp.float16)).block_until_ready()
    with pytest.raises(Exception, match="w must be 2-D"):
        f = lambda x, w: jax.ffi.ffi_call("jaxaccel_matvec", jax.ShapeDtypeStruct((1, 4), jnp.float32))(
            x, w, w_in_axis=np.int64(0))
        jax.jit(f)(x, jnp.ones((8, 4, 1), jnp.float32)).block_until_ready()
    with pytest.raises(Exception, match=r"scales must be \[N, G\]"):
        jax.jit(lambda x, q, s: kernels.matvec(x, q, 1, s))(
            x, jnp.ones((4, 8), jnp.int8), jnp.ones((3, 1), jnp.float32)).block_until_ready()


def test_wants_only_small_row_counts():
    x1, x9 = jnp.ones((1, 8)), jnp.ones((kernels.MAX_ROWS + 1, 8))
    w = jnp.ones((8, 4))
    assert kernels.wants(x1, w) and not kernels.wants(x9, w)
    assert not kernels.wants(x1, w.astype(jnp.float16))


def _decode_step_text(choice, dtype="bfloat16"):
    """The lowered text of one cached decode step of a tiny Llama built with `choice`."""
    from jaxaccel.kv_cache import init_cache
    from jaxaccel.models import registry

    cfg = _tiny().config
    module = registry.build(cfg, dtype, kernels=choice)
    params = jaxaccel.init_random(cfg, seed=0, dtype=dtype).params
    cache = init_cache(cfg, 2, 16, jnp.dtype(dtype))
    step = lambda p, t, c: module.apply({"params": p}, t, cache=c).logits
    return jax.jit(step).lower(params, jnp.ones((2, 1), jnp.int32), cache).as_text()


def test_only_modules_built_for_decoding_call_the_kernels(built):
    """Which kernels a program calls is the module's `kernels` field, fixed where it is built:
    the default (training, scoring, prefill-only programs, sharded models) calls none of them;
    KernelChoice(decode=True) sends decode-sized dots, bfloat16 embedding rows, cache writes and
    one-query attention to them."""
    names = ("jaxaccel_matvec", "jaxaccel_take_rows", "jaxaccel_write_rows", "jaxaccel_decode_attention")
    plain, decode = _decode_step_text(kernels.XLA), _decode_step_text(kernels.KernelChoice(decode=True))
    assert not any(n in plain for n in names)
    assert all(n in decode for n in names)
    assert "jaxaccel_segment_attention" not in decode  # the encoders' kernel is another choice


def test_int8_prefill_rows_go_to_the_kernel_on_int16_builds_only(built):
    """More than MAX_ROWS rows reach the kernel only for int8 weights with scales whose groups are
    a multiple of 32 inputs, on an int16-path build: up to INT8_PREFILL_MAX_ROWS rows on VNNI, up
    to AVX2_PREFILL_MAX_ROWS on AVX2 (XLA's float32 GEMM takes more)."""
    q, s = jnp.ones((48, 64), jnp.int8), jnp.ones((48, 2), jnp.float32)
    x = lambda m, k=64: jnp.ones((m, k))
    int16 = kernels.int8_int16()
    limit = kernels.INT8_PREFILL_MAX_ROWS if kernels.int8_path() == "vnni" else kernels.AVX2_PREFILL_MAX_ROWS
    assert kernels.wants(x(32), q, s) == int16 and kernels.wants(x(limit), q, s) == int16
    assert not kernels.wants(x(limit + 1), q, s)
    assert not kernels.wants(x(32), q.astype(jnp.float32)) and not kernels.wants(x(32), q)  # no scales
    assert not kernels.wants(x(32, 96), jnp.ones((48, 96), jnp.int8), jnp.ones((48, 2), jnp.float32))  # 48 / group
    assert kernels.wants(x(1), q, s)  # decode rows: every build
    odd = jnp.ones((48, 65), jnp.int8)  # 65 inputs in 2 groups: refused by the kernel, so never sent
    assert not kernels.wants(x(32, 65), odd, s) and not kernels.wants(x(32), q, jnp.ones((48, 0)))


def test_dot_routes_only_decode_sized_dots_to_the_kernel(built):
    """kernels.dot: the kernel for at most MAX_ROWS rows; None (XLA's dot) for prefill-sized dots
    (programs not built for decoding never call it: test_only_modules_built_for_decoding_call_the_kernels)."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.bfloat16)
    x1 = jnp.asarray(rng.standard_normal((1, 64)), jnp.bfloat16)
    x32 = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    assert kernels.dot(x32, w, 0, jnp.bfloat16) is None
    lowered = jax.jit(lambda x, w: kernels.dot(x, w, 0, jnp.bfloat16)).lower(x1, w).as_text()
    got = kernels.dot(x1, w, 0, jnp.bfloat16)
    assert "jaxaccel_matvec" in lowered and got.dtype == jnp.bfloat16
    ref = np.asarray(x1, np.float32) @ np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("V", [1, 7, 16, 33, 1000, 262144])
def test_argmax_kernel_equals_jnp_argmax(built, V):
    """The greedy token: the first maximum, the first NaN where a row has one, index 0 for a row
    of -inf; any vocabulary length (vector blocks and a scalar tail), leading axes kept; and
    sampling.argmax calls it in decode programs only."""
    from jaxaccel import sampling

    rng = np.random.default_rng(V)
    x = rng.standard_normal((2, 4, V)).astype(np.float32)
    x[0, 1, :] = -np.inf
    x[0, 2, V // 3] = x[0, 2, V - 1] = np.inf  # tied maxima: the first
    x[1, 0, V - 1] = np.nan
    x[1, 1, V // 2] = np.nan
    x[1, 1, 0] = np.inf  # a NaN wins over an earlier +inf, as in jnp.argmax
    x[1, 2, :] = 0.0
    got = jax.jit(kernels.argmax)(x)
    assert got.dtype == jnp.int32 and got.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
    decode = jax.jit(lambda x: sampling.argmax(x, kernels.KernelChoice(decode=True)))
    assert "jaxaccel_argmax" in decode.lower(x).as_text()
    assert "jaxaccel_argmax" not in jax.jit(sampling.argmax).lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(decode(x)), np.asarray(got))
    assert kernels.argmax(x.astype(jnp.bfloat16)) is None  # other dtypes: the caller's reductions


def test_take_rows_equals_take_and_fills_bad_ids_with_nan(built):
    """kernels.take_rows (bfloat16 tables, decode programs) = jnp.take bit for bit: negative ids
    count from the end, ids still outside the table give NaN rows (jnp.take's fill); other
    tables: None."""
    table = jnp.asarray(np.random.default_rng(2).standard_normal((300, 48)), jnp.bfloat16)
    ids = jnp.asarray([[0, 299, 17, -1, 5], [300, 8, -300, -301, 2]], jnp.int32)
    assert kernels.take_rows(table.astype(jnp.float32), ids) is None
    got = jax.jit(kernels.take_rows)(table, ids)
    lowered = jax.jit(kernels.take_rows).lower(table, ids).as_text()
    assert "jaxaccel_take_rows" in lowered and got.shape == (2, 5, 48) and got.dtype == jnp.bfloat16
    ref = jnp.take(table, ids, axis=0)  # fill mode: NaN rows for 300 and -301
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))
    good = np.asarray((ids >= -300) & (ids < 300))
    assert (~good).sum() == 2
    np.testing.assert_array_equal(bits(got)[good], bits(ref)[good])
    assert np.isnan(np.asarray(got, np.float32)[~good]).all() and np.isnan(np.asarray(ref, np.float32)[~good]).all()
    with pytest.raises(Exception, match=r"table \[V, D\], ids \[n\] and out \[n, D\]"):
        f = lambda t, i: jax.ffi.ffi_call("jaxaccel_take_rows", jax.ShapeDtypeStruct((2, 47), jnp.bfloat16))(t, i)
        jax.jit(f)(table, jnp.asarray([1, 2], jnp.int32)).block_until_ready()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_write_rows_equals_dynamic_update_slice(built, dtype):
    """kernels.write_rows (the KV cache write of decode programs) = each row's
    lax.dynamic_update_slice bit for bit, clamped starts included."""
    rng = np.random.default_rng(4)
    buf = jnp.asarray(rng.standard_normal((3, 10, 2, 8)) * 50, dtype)
    rows = jnp.asarray(rng.standard_normal((3, 4, 2, 8)) * 50, dtype)
    index = jnp.asarray([0, 5, 9], jnp.int32)  # 9 + 4 > 10: starts at 6, as dynamic_update_slice
    ref = jax.vmap(lambda b, r, i: jax.lax.dynamic_update_slice(b, r, (i, 0, 0)))(buf, rows, index)
    f = jax.jit(kernels.write_rows)
    assert "jaxaccel_write_rows" in f.lower(buf, rows, index).as_text()
    got = f(buf, rows, index)
    with pytest.raises(Exception, match=r"buf \[B, S, ...\], rows \[B, T, ...\]"):
        call = jax.ffi.ffi_call("jaxaccel_write_rows", jax.ShapeDtypeStruct(buf.shape, buf.dtype),
                                input_output_aliases={0: 0})
        jax.jit(call)(buf, jnp.zeros((3, 11, 2, 8), dtype), index).block_until_ready()
    assert got.dtype == buf.dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))


def _decode_attention_reference(q, keys, values, index, scale, window, softcap):
    """layers.Attention._attend's math for T queries per row at slots index[b] + t (jnp, every
    slot scored and masked)."""
    B, T, N, H = q.shape
    S, K = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    slot, q_slot = jnp.arange(S)[None, None, :], (index[:, None] + jnp.arange(T)[None, :])[:, :, None]
    mask = slot <= q_slot
    if window:
        mask &= slot > q_slot - window
    scores = jnp.where(mask[:, None, None, :, :], scores, np.finfo(np.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(keys.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N,K,H,window,softcap", [(4, 1, 64, None, None), (8, 4, 32, 5, None), (6, 2, 20, None, 30.0),
                                                  (4, 4, 48, 40, 50.0)])
def test_decode_attention_equals_xla_attention(built, dtype, N, K, H, window, softcap):
    """kernels.decode_attention (generation on CPU) = the XLA attention it replaces, over rows at
    different cache positions (first slot, middle, last), sliding windows, soft-capping and
    grouped heads; NaN queries give NaN rows as XLA's softmax does."""
    rng = np.random.default_rng(N * K + H)
    B, S = 3, 37
    q = jnp.asarray(rng.standard_normal((B, 1, N, H)), dtype)
    keys, values = (jnp.asarray(rng.standard_normal((B, S, K, H)) * 2, dtype) for _ in range(2))
    index = jnp.asarray([0, 17, S - 1], jnp.int32)
    assert kernels.wants_decode_attention(q, keys, dtype)
    assert not kernels.wants_decode_attention(q, keys, "float16")  # another dtype: XLA's
    f = jax.jit(lambda q, k, v, i: kernels.decode_attention(q, k, v, i, 0.3, window, softcap))
    got = np.asarray(f(q, keys, values, index))
    ref = np.asarray(_decode_attention_reference(q, keys, values, index, 0.3, window, softcap))
    # bfloat16: probabilities rounded to bfloat16 on both sides; the kernel's exp may round one
    # to its neighbour, one step of 2^-8 relative
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    bad = q.at[1, 0, 0, 0].set(jnp.nan)
    out = np.asarray(f(bad, keys, values, index))
    assert np.isnan(out[1, 0, 0]).all() and np.isfinite(out[1, 0, 1:]).all() and np.isfinite(out[[0, 2]]).all()


def _cache_attention_like_xla(q, keys, values, index, scale, window, softcap, tol):
    """The kernel's output for q against the cache, asserted equal to XLA's masked attention
    (`_decode_attention_reference`) within tol; returns the jitted kernel call for more checks."""
    f = jax.jit(lambda q, k, v, i: kernels.decode_attention(q, k, v, i, scale, window, softcap))
    got = np.asarray(f(q, keys, values, index))
    ref = np.asarray(_decode_attention_reference(q, keys, values, index, scale, window, softcap))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    return f


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,window,softcap", [(1, None, None), (1, 300, 50.0), (2, None, None)])
def test_long_decode_attention_split_over_slots_equals_xla_attention(built, dtype, B, window, softcap):
    """Gemma 3 270M's decode attention shape (4 query heads on one KV head of 256) at a long
    context: with fewer (row, KV head) tasks than threads the kernel splits the slots into parts
    (scores per part, one softmax, values per part summed); equal to XLA's attention, and a NaN
    query still gives a NaN row."""
    rng = np.random.default_rng(B + (window or 0))
    N, K, H, S = 4, 1, 256, 700
    q = jnp.asarray(rng.standard_normal((B, 1, N, H)), dtype)
    keys, values = (jnp.asarray(rng.standard_normal((B, S, K, H)), dtype) for _ in range(2))
    index = jnp.asarray([S - 1, 411][:B], jnp.int32)
    f = _cache_attention_like_xla(q, keys, values, index, 0.0625, window, softcap,
                                  tol=1e-5 if dtype == "float32" else 2e-3)
    out = np.asarray(f(q.at[0, 0, 2, 7].set(jnp.nan), keys, values, index))
    assert np.isnan(out[0, 0, 2]).all() and np.isfinite(np.delete(out[0, 0], 2, axis=0)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N,K,H,window,softcap", [(4, 1, 256, None, None), (8, 4, 32, 5, None), (6, 2, 20, 9, 30.0)])
def test_prefill_attention_through_the_cache_kernel_equals_xla_attention(built, dtype, N, K, H, window, softcap):
    """Several queries per row (a prefill from slot 0, a speculative check or chunked prefill from
    a later slot): query t at slot index[b] + t attends to its window of slots up to its own, as
    XLA's masked attention over the whole cache; a NaN query gives a NaN row."""
    rng = np.random.default_rng(N + H)
    B, T, S = 2, 13, 40
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    keys, values = (jnp.asarray(rng.standard_normal((B, S, K, H)) * 2, dtype) for _ in range(2))
    index = jnp.asarray([0, 21], jnp.int32)
    # float32: dots of 256 terms summed in another order than XLA's, through a peaked softmax (a
    # wrong slot attended to would be off by O(1))
    f = _cache_attention_like_xla(q, keys, values, index, 0.3, window, softcap,
                                  tol=1e-4 if dtype == "float32" else 2e-3)
    out = np.asarray(f(q.at[1, 4, 0, 0].set(jnp.nan), keys, values, index))
    assert np.isnan(out[1, 4, 0]).all() and np.isfinite(out[1, 4, 1:]).all() and np.isfinite(out[0]).all()
    assert np.isfinite(np.delete(out[1], 4, axis=0)).all()


def test_decode_attention_refuses_bad_shapes(built):
    q = jnp.ones((2, 1, 4, 8), jnp.float32)
    k = jnp.ones((2, 5, 3, 8), jnp.float32)  # 3 KV heads do not divide 4 query heads
    attend = jax.jit(lambda q, k, i: kernels.decode_attention(q, k, k, i, 1.0, None, None))
    with pytest.raises(Exception, match="KH dividing N"):
        attend(q, k, jnp.zeros((2,), jnp.int32)).block_until_ready()
    with pytest.raises(Exception, match="cache must be float32 or bfloat16"):
        attend(q, jnp.ones((2, 5, 2, 8), jnp.int8), jnp.zeros((2,), jnp.int32)).block_until_ready()


def _tiny(**kw):
    # weights over the kernel's 128 KB hand-off threshold: pool threads take part
    cfg = ModelConfig(family="llama", vocab_size=300, hidden_size=128, intermediate_size=384, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256, **kw)
    return jaxaccel.init_random(cfg, seed=3, dtype="float32")


def _greedy(model, use_kernel, monkeypatch):
    monkeypatch.setattr(kernels, "usable", lambda m: use_kernel)
    fresh = dataclasses.replace(model)  # a new Model: no engine (and programs) cached from before
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
    return generation.generate_tokens(fresh, prompts, max_new_tokens=20)


@pytest.mark.parametrize("variant", ["float32", "bfloat16", "int8", "int4", "tied"])
def test_generation_with_the_kernel_equals_xla(built, variant, monkeypatch):
    model = _tiny(tie_word_embeddings=(variant == "tied"))
    if variant in ("bfloat16", "int8", "int4"):
        model = model.quantize(jaxaccel.QuantConfig(mode=variant, embedding_group_size=16))
    ref = _greedy(model, False, monkeypatch)
    got = _greedy(model, True, monkeypatch)
    assert [list(r) for r in got] == [list(r) for r in ref]


def test_generation_program_calls_the_kernel(built, monkeypatch):
    """The decode loop's lowered program holds the custom call (it is really used)."""
    model = _tiny()
    eng = engine.Engine(model)
    seen = {}
    real = jax.ffi.ffi_call

    def spy(target, *a, **k):
        seen[target] = seen.get(target, 0) + 1
        return real(target, *a, **k)

    monkeypatch.setattr(jax.ffi, "ffi_call", spy)
    eng._program(1, 16, 32).result()
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head, all traced once in the decode body
    assert seen.get("jaxaccel_matvec", 0) >= 2 * 7 + 1, seen
    assert seen.get("jaxaccel_write_rows", 0) >= 2 * 2, seen  # k and v of each layer, in place
    assert seen.get("jaxaccel_decode_attention", 0) >= 2, seen  # each layer's decode attention
    assert "jaxaccel_take_rows" not in seen  # float32 table: XLA's gather
    engine.Engine(model.quantize(jaxaccel.QuantConfig(mode="bfloat16")))._program(1, 16, 32).result()
    assert seen.get("jaxaccel_take_rows", 0) >= 1, seen  # bfloat16 table: the row kernel


def test_decode_loop_does_not_copy_the_kv_cache(built):
    """The KV cache is written in place: XLA's CPU backend fused dynamic_update_slice into both
    the new cache and the attention, each on its own copy of every layer's cache, every step."""
    cfg = ModelConfig(family="llama", vocab_size=300, hidden_size=128, intermediate_size=384, num_layers=2,
                      num_heads=4, num_kv_heads=1, head_dim=32, max_position_embeddings=256)
    model = jaxaccel.init_random(cfg, seed=3, dtype="float32")  # one KV head, as Gemma 3 270M: copied before
    eng = engine.Engine(model)
    B, S, T, new_cap = 1, 48, 16, 32
    compiled = eng._program(B, T, new_cap).result()
    text = compiled.as_text() if hasattr(compiled, "as_text") else str(compiled)
    cache_shape = f"f32[{B},{S},{model.config.num_kv_heads},{model.config.head_dim}]"
    copies = [ln for ln in text.splitlines() if " copy(" in ln and cache_shape in ln.split("=")[1].split("copy(")[0]]
    assert not copies, copies[:4]


SAVED_TRACE_RUN = """
import sys, jaxaccel
from jax import export
from jaxaccel import generation, program_cache
program_cache.set_folder(sys.argv[1])
if sys.argv[3] == "second":  # a fresh process must use the saved program (kernel call inside)
    export.export = None
m = jaxaccel.load(sys.argv[2])
print([list(map(int, r)) for r in generation.generate_tokens(m, [[3, 4, 5], [6]], max_new_tokens=12)])
"""


def test_saved_program_with_the_kernel_runs_in_a_fresh_process(built, tmp_path, hf_folder):
    from mesh_util import run_python

    folder = str(hf_folder("llama3")[0])
    outs = [run_python("-c", SAVED_TRACE_RUN, tmp_path / "programs", folder, which, devices=1,
                       env={"JAXACCEL_CACHE": str(tmp_path)}).stdout.strip().splitlines()[-1]
            for which in ("first", "second")]
    assert outs[0] == outs[1]
    saved = list((tmp_path / "programs").glob("*.jaxexport"))
    assert len(saved) == 1 and b"jaxaccel_matvec" in saved[0].read_bytes()


def test_no_compiler_falls_back_to_xla_with_one_warning(tmp_path):
    """A machine without a C++ compiler still generates (XLA's dots) and says why, once."""
    code = """
import warnings, jaxaccel
from jaxaccel import generation, kernels
from jaxaccel.config import ModelConfig
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m = jaxaccel.init_random(ModelConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128), seed=0)
    out = generation.generate_tokens(m, [[1, 2, 3]], max_new_tokens=4)
    generation.generate_tokens(m, [[1, 2, 3, 4, 5]], max_new_tokens=40)
msgs = [str(w.message) for w in caught if "CPU kernels" in str(w.message)]
assert len(out[0]) == 4 and not kernels.usable(m)
assert len(msgs) == 1 and "C++ compiler" in msgs[0], msgs
print("ok")
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "JAXACCEL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_failing_compile_is_reported_and_falls_back(tmp_path, monkeypatch):
    """A compiler that fails on a source: load() is False, says which compiler failed and why,
    and leaves no library or object files in the cache."""
    monkeypatch.setattr(kernels.build, "_loaded", {})
    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(kernels.FLAGS_ENV, "-DJAXACCEL_BREAK_THE_BUILD -include /no/such/header.h")
    with pytest.warns(RuntimeWarning, match=r"(?s)unavailable.*failed.*no/such/header"):
        assert not kernels.load()
    assert not kernels.usable(None) and not list((tmp_path / "kernels").iterdir())


def test_env_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(kernels.build, "_loaded", {})
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.load()
