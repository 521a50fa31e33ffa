"""The CPU segment-attention kernel (jaxaccel/kernels/attention.cc) used by the encoders' programs:
equal to a float64 reference and to the XLA attention it replaces, really used, packing wider
rows with it, and clear errors."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from jaxaccel import encoder_tasks, kernels
from jaxaccel.config import ModelConfig
from jaxaccel.layers import Attention


@pytest.fixture(scope="module")
def built():
    assert kernels.load(), f"the CPU kernels must build on the test machine: {kernels.build._loaded.get('error')}"


def reference(q, k, v, seg, scale):
    """float64 softmax attention within segments; padding queries (segment 0) -> 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            if seg[b, t] == 0:
                continue
            keys = np.flatnonzero(seg[b] == seg[b, t])
            for n in range(N):
                s = scale * k[b, keys, n // G] @ q[b, t, n]
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, keys, n // G]
    return out


def packed_segments(rng, B, T, pad_tail=True):
    """Rows of consecutive texts of random lengths (1 to T), padding at the end of some rows."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        at, k = 0, 1
        end = T - int(rng.integers(0, T // 3)) if pad_tail and b % 2 else T
        while at < end:
            n = min(int(rng.integers(1, T + 1)), end - at)
            seg[b, at:at + n] = k
            at, k = at + n, k + 1
    return seg


# H = 32 / 64: the AVX-512 blocks; 12 / 8 / 40: the generic loops. KH < N: grouped-query heads.
# T over 16 and not a multiple of 16 (key tails), T = 300 (long texts), B = 1 (few segments: the
# heads are split between tasks)
@pytest.mark.parametrize("B,T,N,KH,H", [(3, 37, 4, 4, 32), (2, 64, 12, 12, 64), (4, 21, 6, 2, 12),
                                        (1, 300, 2, 1, 32), (2, 9, 3, 3, 8), (2, 50, 4, 2, 40)])
def test_attention_equals_the_float64_reference(built, B, T, N, KH, H):
    rng = np.random.default_rng(T * N + H)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (N, KH, KH))
    seg = packed_segments(rng, B, T)
    scale = H ** -0.5
    got = np.asarray(jax.jit(lambda *a: kernels.attention(*a, scale))(q, k, v, jnp.asarray(seg)))
    assert got.shape == (B, T, N, H) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(q, k, v, seg, scale), rtol=1e-5, atol=2e-6)


def test_segments_need_not_be_contiguous_and_padding_rows_are_zero(built):
    """Equal ids attend to each other wherever they are (as the XLA mask does); an all-padding
    row and padding between texts get zeros; single-token segments return their value."""
    rng = np.random.default_rng(0)
    B, T, N, H = 3, 24, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
    seg = np.zeros((B, T), np.int32)
    seg[0] = rng.integers(0, 4, T)  # ids 1..3 interleaved with padding
    seg[2, 5] = 7  # one token alone
    got = np.asarray(kernels.attention(q, k, v, jnp.asarray(seg), 0.25))
    np.testing.assert_allclose(got, reference(q, k, v, seg, 0.25), rtol=1e-5, atol=2e-6)
    assert not got[1].any() and not got[0][seg[0] == 0].any()
    np.testing.assert_array_equal(got[2, 5], np.asarray(v)[2, 5])


def test_large_scores_stay_finite_and_exact(built):
    """Scores in the hundreds: the softmax subtracts the max (no overflow to inf / NaN)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 2, 32)) * 6, jnp.float32) for _ in range(3))
    seg = packed_segments(rng, 2, 40)
    got = np.asarray(kernels.attention(q, k, v, jnp.asarray(seg), 1.0))
    assert np.isfinite(got).all()
    # float32 scores of magnitude ~200 carry ~1e-4 absolute rounding, so probabilities ~1e-4 relative
    np.testing.assert_allclose(got, reference(q, k, v, seg, 1.0), rtol=1e-4, atol=1e-3)


def test_nan_reaches_the_outputs_it_touches(built):
    """A NaN query poisons its own output; a NaN key every query of its segment and head (as XLA's
    softmax does); everything else stays exact."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 30, 4, 32)).astype(np.float32) for _ in range(3))
    seg = packed_segments(rng, 2, 30, pad_tail=False)
    q[0, 3, 1, 7] = np.nan
    k[1, 20, 2, 0] = np.nan
    got = np.asarray(kernels.attention(*map(jnp.asarray, (q, k, v, seg)), 0.2))
    want = reference(q, k, v, seg, 0.2)
    assert np.isnan(got[0, 3, 1]).all() and np.isnan(got[1][seg[1] == seg[1, 20], 2]).all()
    assert np.isnan(got).sum() == np.isnan(want).sum()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)  # NaNs in the same places


def test_attention_module_with_the_kernel_equals_xla(built):
    """The shared layers.Attention (bidirectional, GQA, segments) gives the same outputs at every
    non-padding position when built with KernelChoice(segment_attention=True) as with XLA's ops."""
    cfg = ModelConfig(family="bert", vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, causal=False,
                      absolute_positions=True, attention_bias=True, o_bias=True)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 30, 64)), jnp.float32)
    seg = packed_segments(rng, 3, 30)
    pos = jnp.zeros((3, 30), jnp.int32)
    module = Attention(cfg, 0)
    params = module.init(jax.random.PRNGKey(0), x, pos, jnp.asarray(seg))

    def run(on):
        built_with = Attention(cfg, 0, kernels=kernels.KernelChoice(segment_attention=on))

        def f(p, x, s):
            return built_with.apply(p, x, pos, s)[0]
        return jax.jit(f)(params, x, jnp.asarray(seg)), jax.jit(f).lower(params, x, jnp.asarray(seg)).as_text()

    (got, text), (ref, ref_text) = run(True), run(False)
    assert "jaxaccel_segment_attention" in text and "jaxaccel_segment_attention" not in ref_text
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_only_float_heads_go_to_the_kernel():
    a = jnp.ones((1, 4, 2, 8), jnp.float32)
    assert kernels.wants_attention(a, a, a) and kernels.wants_attention(a.astype(jnp.bfloat16), a, a)
    assert not kernels.wants_attention(a.astype(jnp.int32), a, a) and not kernels.wants_attention(a[0], a, a)


def test_bad_shapes_are_refused_clearly(built):
    q = jnp.ones((2, 5, 4, 8), jnp.float32)
    seg = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"k, v \[B, T, KH, H\] with KH dividing N"):
        kernels.attention(q, jnp.ones((2, 5, 3, 8)), jnp.ones((2, 5, 3, 8)), seg, 1.0)
    with pytest.raises(ValueError, match=r"k, v \[B, T, KH, H\]"):
        kernels.attention(q, jnp.ones((2, 5, 4, 8)), jnp.ones((2, 5, 4, 4)), seg, 1.0)
    with pytest.raises(ValueError, match=r"segments must be \[B, T\] = \(2, 5\), got \(2, 4\)"):
        kernels.attention(q, q, q, jnp.ones((2, 4), jnp.int32), 1.0)
    with pytest.raises(ValueError, match=r"q must be \[B, T, N, H\]"):
        kernels.attention(q[0], q[0], q[0], seg, 1.0)
    with pytest.raises(ValueError, match="KH dividing N"):
        kernels.attention(q, q[:, :, :0], q[:, :, :0], seg, 1.0)
    # the C++ checks, for callers of the FFI target
    call = lambda out: lambda q, k, s: jax.ffi.ffi_call("jaxaccel_segment_attention", jax.ShapeDtypeStruct(
        out, jnp.float32))(q, k, k, s, scale=np.float32(1))
    with pytest.raises(Exception, match="KH dividing N"):
        jax.jit(call(q.shape))(q, jnp.ones((2, 5, 3, 8), jnp.float32), seg).block_until_ready()
    with pytest.raises(Exception, match="out like q"):
        jax.jit(call((2, 5, 4, 4)))(q, q, seg).block_until_ready()


def _bert():
    cfg = ModelConfig(family="bert", vocab_size=120, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=2, num_kv_heads=2, head_dim=32, max_position_embeddings=128, causal=False,
                      absolute_positions=True, attention_bias=True, o_bias=True, mlp_bias=True,
                      tie_word_embeddings=True, activation="gelu", type_vocab_size=2, head="encoder")
    return jaxaccel.init_random(cfg, seed=5, dtype="float32")


def test_encoder_programs_use_the_kernel_and_match_xla(built):
    """The embed program holds the custom call on CPU and equals the module run through XLA."""
    m = _bert()
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(1, 120, (4, 40)), jnp.int32)
    mask = np.zeros((4, 40), np.int32)
    for b, n in enumerate([40, 3, 17, 1]):
        mask[b, :n] = 1
    fn = encoder_tasks.programs(m)["embed"]
    assert "jaxaccel_segment_attention" in fn.lower(m.params, tokens, jnp.asarray(mask)).as_text()
    got = np.asarray(fn(m.params, tokens, jnp.asarray(mask)))
    h = np.asarray(m.module.apply({"params": m.params}, tokens, segment_ids=jnp.asarray(mask)).hidden)
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_packing_uses_wide_rows_with_the_kernel(built, monkeypatch):
    """With the kernel every text up to the max length packs (rows of the max length, about the
    same tokens per batch); without it rows stay PACK_WIDTH long. Both give the same embeddings."""
    m = dataclasses.replace(_bert(), tokenizer=SimpleNamespace(pad_token_id=0, model_max_length=128))
    rng = np.random.default_rng(4)
    ids = [[2, *rng.integers(5, 120, n).tolist(), 3] for n in rng.integers(0, 126, 60)]
    assert encoder_tasks.pack_width(m) == min(encoder_tasks.KERNEL_PACK_WIDTH, encoder_tasks.max_length(m)) == 128
    wide = encoder_tasks.EncodeStats()
    got = encoder_tasks._run(m, "embed", ids, 8, False, wide, pack=True)
    rows = encoder_tasks.pack_rows(list(map(len, ids)), 128)
    assert wide.tokens == sum(map(len, ids)) and wide.padded_tokens == len(rows) * 128  # no padding rows
    assert wide.batches == len(rows) // 4 + len(rows) % 4  # 4 rows (8 x 64 tokens) a batch, the rest 1 by 1

    monkeypatch.setattr(kernels, "usable", lambda model: False)
    narrow_model = dataclasses.replace(m)  # a new Model: programs traced again, without the kernel
    assert encoder_tasks.pack_width(narrow_model) == encoder_tasks.PACK_WIDTH
    narrow = encoder_tasks.EncodeStats()
    ref = encoder_tasks._run(narrow_model, "embed", ids, 8, False, narrow, pack=True)
    assert narrow.padded_tokens > wide.padded_tokens
    assert "jaxaccel_segment_attention" not in encoder_tasks.programs(narrow_model)["embed_packed"].lower(
        m.params, *[jnp.zeros((1, 64), jnp.int32)] * 3).as_text()
    np.testing.assert_allclose(np.stack(got), np.stack(ref), rtol=1e-5, atol=1e-6)
