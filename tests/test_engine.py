"""Generation engine: greedy parity with transformers, sampling statistics, compile counts, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxaccel
from jaxaccel import engine, generation, sampling, streaming
from jaxaccel.engine import MIN_PROMPT_BUCKET, bucket, prompt_bucket
from jaxaccel.generation import _engine, _eos_ids, generate_tokens
from conftest import FAMILY_KINDS

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24], [40]]


def hf_greedy(model, prompts, new):
    """transformers generate (greedy), left-padded batch; rows cut after their first EOS."""
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[:, L:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = []
    for row in out:
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        cut.append(row if stop is None else row[: stop + 1])
    return cut


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_greedy_equals_transformers_generate(kind, hf_folder):
    folder, ref = hf_folder(kind)
    m = jaxaccel.load(folder)
    ours = generate_tokens(m, PROMPTS, max_new_tokens=32)
    assert ours == hf_greedy(ref, PROMPTS, 32)
    assert max(map(len, ours)) > 8  # the comparison covers real decoding, not just an early EOS
    # batching does not change a row
    assert generate_tokens(m, PROMPTS[1:2], max_new_tokens=32) == ours[1:2]


def test_same_seed_same_tokens_different_seed_differs(hf_folder):
    folder, _ = hf_folder("llama3")
    m = jaxaccel.load(folder)
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9)
    a = generate_tokens(m, PROMPTS, seed=7, **kw)
    assert a == generate_tokens(m, PROMPTS, seed=7, **kw)
    assert generate_tokens(m, PROMPTS[2:3], seed=7, **kw) == a[2:3]  # independent of batch mates
    assert a != generate_tokens(m, PROMPTS, seed=8, **kw)


def _expected_probs(logits, temperature, top_k=None, top_p=None):
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    keep[order[: top_k or len(z)]] = True
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    if top_p is not None:
        sp = p[order]
        before = np.cumsum(sp) - sp
        drop = order[before >= top_p]
        p[drop] = 0
        p /= p.sum()
    return p


@pytest.mark.parametrize("top_k,top_p,candidates", [(None, None, None), (5, None, None), (None, 0.6, None),
                                                    (8, 0.75, None), (None, 0.6, "enough"), (None, 0.6, "second"),
                                                    (None, 0.6, "short")])
def test_sampling_frequencies_match_truncated_softmax(top_k, top_p, candidates, hf_folder, monkeypatch):
    """4096 independent samples of the first token (one seed per row) vs the exact distribution.
    candidates: top-p alone with fewer candidates (sampling.CANDIDATES) than the vocabulary:
    the first count just enough to hold top_p of the mass; one short of it and the second count
    enough; or every count short (then the full sort decides)."""
    from scipy.stats import chisquare

    folder, _ = hf_folder("qwen2")
    m = jaxaccel.load(folder)
    prompt = [3, 1, 4, 1, 5]
    temperature = 0.7
    logits = np.asarray(m.logits(np.asarray([prompt])))[0, -1] * 0.15  # flatten so many tokens matter
    if candidates:
        z = logits.astype(np.float64) / temperature
        mass = np.cumsum(np.sort(np.exp(z - z.max()) / np.exp(z - z.max()).sum())[::-1])
        needed = int(np.searchsorted(mass, top_p)) + 1  # the fewest most likely tokens holding top_p
        assert 2 < needed < m.config.vocab_size - 1
        counts = {"enough": (needed + 1,), "second": (needed - 1, needed + 1), "short": (needed - 2, needed - 1)}
        monkeypatch.setattr(sampling, "CANDIDATES", counts[candidates])
    scaled = m  # the model is fixed; temperature folds the 0.15 into the sampler below
    n = 4096
    out = generate_tokens(scaled, [prompt] * n, max_new_tokens=1, temperature=temperature / 0.15,
                          top_k=top_k, top_p=top_p, seed=list(range(n)))
    counts = np.bincount([r[0] for r in out], minlength=m.config.vocab_size)
    p = _expected_probs(logits, temperature, top_k, top_p)
    assert counts[p == 0].sum() == 0, "sampled a token that truncation removes"
    support = p > 0
    assert support.sum() >= 3
    # merge tiny-expectation cells so the chi-square approximation holds
    exp, obs = n * p[support], counts[support]
    small = exp < 5
    if small.any():
        exp = np.append(exp[~small], exp[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    stat, pvalue = chisquare(obs, exp)
    assert pvalue > 1e-3, (stat, pvalue)


def test_prompt_buckets_step_by_half_octaves():
    """Prompts pad to 16, 24, 32, 48, 64, 96, ...: never more than 1.5x their length past 16 (a
    33-token prompt prefills 48 rows, not 64), each bucket the smallest that holds the prompt."""
    got = [prompt_bucket(n) for n in range(1, 1100)]
    assert sorted(set(got)) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536]
    for n, b in zip(range(1, 1100), got):
        assert b >= n and (b == MIN_PROMPT_BUCKET or b < 1.5 * n) and b % 8 == 0, (n, b)
    assert prompt_bucket(33) == 48 and prompt_bucket(32) == 32 and bucket(33) == 64


def test_compiles_at_most_one_program_per_bucket(hf_folder):
    folder, _ = hf_folder("mistral")
    m = jaxaccel.load(folder)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=20)
    buckets = {prompt_bucket(int(n)) for n in lengths}
    for n in lengths:
        generate_tokens(m, [rng.integers(0, 97, size=int(n)).tolist()], max_new_tokens=12)
    assert len(buckets) >= 3
    assert _engine(m).compiled_programs <= len(buckets)


def test_cache_reuse_is_clean(hf_folder):
    """The donated cache is reused across calls; stale slots never leak into the next prompt."""
    folder, _ = hf_folder("gemma3")
    m = jaxaccel.load(folder)
    first = generate_tokens(m, PROMPTS, max_new_tokens=20)
    generate_tokens(m, [[9] * 14, [1, 2]], max_new_tokens=40)
    assert generate_tokens(m, PROMPTS, max_new_tokens=20) == first


def test_host_step_streams_every_token_and_can_stop_rows(hf_folder, monkeypatch):
    """A slow device (here: a zero streaming interval) streams one token per call."""
    monkeypatch.setattr(streaming, "STREAM_INTERVAL_S", 0.0)
    folder, _ = hf_folder("llama_tied")
    m = jaxaccel.load(folder)
    seen = []

    def host(tokens, first_step):
        seen.append((first_step, tokens.copy()))
        return np.array([first_step >= 3] + [False] * (tokens.shape[0] - 1))

    out = generate_tokens(m, PROMPTS[:2], max_new_tokens=10, host_step=host)
    full = generate_tokens(m, PROMPTS[:2], max_new_tokens=10)
    assert [s for s, _ in seen][:4] == [0, 1, 2, 3]
    assert out[0] == full[0][:4]  # row 0 stopped by the host after 4 tokens
    assert out[1] == full[1]


def test_streaming_chunks_grow_on_a_fast_device(hf_folder, monkeypatch):
    """Where a token takes far less than STREAM_INTERVAL_S, calls after the first decode several
    tokens (1, then 1 and 2 to measure, then at most MAX_STREAM_CHUNK): the same tokens as one
    call, and a row the host stops ends with the chunk it was stopped in."""
    monkeypatch.setattr(streaming, "STREAM_INTERVAL_S", 60.0)
    monkeypatch.setattr(streaming, "MAX_STREAM_CHUNK", 4)
    folder, _ = hf_folder("llama_tied")
    m = jaxaccel.load(folder)
    full = generate_tokens(m, PROMPTS[:2], max_new_tokens=12)
    seen = []

    def host(tokens, first_step):
        seen.append((first_step, tokens.shape[1]))
        return np.array([first_step >= 4] + [False] * (tokens.shape[0] - 1))

    out = generate_tokens(m, PROMPTS[:2], max_new_tokens=12, host_step=host)
    assert seen == [(0, 1), (1, 1), (2, 2), (4, 4), (8, 4)]
    assert out[0] == full[0][:8]  # stopped in the chunk that starts at 4
    assert out[1] == full[1]
    # several processes: every call one token (their timings would differ); chunk must be >= 1
    monkeypatch.setattr(engine.jax, "process_count", lambda: 2)
    seen.clear()
    assert generate_tokens(m, PROMPTS[:2], max_new_tokens=5, host_step=lambda t, f: seen.append(f) or
                           np.zeros(t.shape[0], bool)) == [r[:5] for r in full]
    assert seen == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        _engine(m).run(PROMPTS[:1], 4, sampling.rows([(0.0, None, None)], 97), [0], [], host, chunk=0)


def test_compiler_options_reach_the_generation_program(hf_folder, monkeypatch):
    """program_cache.COMPILER_OPTIONS[backend] is what bench.profile_decode's variants set: XLA sees it
    (an unknown option is refused at compile time; a known one compiles and generates the same)."""
    import jax

    from jaxaccel import program_cache

    folder, _ = hf_folder("llama3")
    expected = generate_tokens(jaxaccel.load(folder), PROMPTS[:1], max_new_tokens=4)
    backend = jax.default_backend()
    monkeypatch.setitem(program_cache.COMPILER_OPTIONS, backend, {"xla_no_such_option": 1})
    with pytest.raises(Exception, match="No such compile option: 'xla_no_such_option'"):
        generate_tokens(jaxaccel.load(folder), PROMPTS[:1], max_new_tokens=4)
    monkeypatch.setitem(program_cache.COMPILER_OPTIONS, backend, {"xla_gpu_enable_command_buffer": ""})
    assert generate_tokens(jaxaccel.load(folder), PROMPTS[:1], max_new_tokens=4) == expected


def test_stream_chunks_tell_call_cost_from_token_cost(monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_INTERVAL_S", 0.025)
    monkeypatch.setattr(streaming, "MAX_STREAM_CHUNK", 64)

    def sizes(per_call, per_token, calls=5, prefill=0.05):
        plan, out = streaming.StreamChunks(), []
        k = plan.next(1, prefill + per_call + per_token)
        for _ in range(calls):
            out.append(k)
            k = plan.next(k, per_call + k * per_token)
        return out

    assert sizes(0.003, 0.001) == [1, 2, 22, 22, 22]  # a GPU: a call 3 ms, a token 1 ms
    assert sizes(0.0005, 0.030) == [1, 2, 1, 1, 1]  # this CPU, Gemma 3 float32: every token
    assert sizes(0.040, 0.001) == [1, 2, 64, 64, 64]  # a call costs more than the interval
    plan = streaming.StreamChunks()
    plan.next(1, 0.05), plan.next(1, 0.004)
    assert plan.next(2, 0.003) == 16  # a faster 2-token call (noise): 1.5 ms a token, no call cost


def test_generate_cuts_at_stop_strings_in_chunks(hf_folder, monkeypatch):
    """Stop strings end the text where they start, the streamed pieces add up to exactly that
    (text that may start a stop string is held back, and sent at the end if none comes), and the
    counted tokens end with the one that completed the stop string, whatever the chunk sizes."""
    import dataclasses

    class Letters:  # token id -> one letter
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    folder, _ = hf_folder("llama_tied")
    m = dataclasses.replace(jaxaccel.load(folder), tokenizer=Letters())
    kw = dict(max_new_tokens=24, temperature=1.0, seed=3)
    text = Letters().decode(generate_tokens(m, PROMPTS[:1], **kw)[0])
    # a first occurrence completed inside a chunk of 4 (chunks end after 1, 2, 4, 8, 12, ... tokens)
    start = next(j for j in range(6, 20) if text.find(text[j:j + 2]) == j and (j + 2) % 4)
    cases = [([text[start:start + 2]], text[:start], start + 2),  # cut where it starts; counted to its end
             ([text[-1] + "#"], text, 24)]  # never completes: the held-back last letter is sent at the end
    for interval in (0.0, 60.0):  # one token a call; chunks of up to 4
        monkeypatch.setattr(streaming, "STREAM_INTERVAL_S", interval)
        monkeypatch.setattr(streaming, "MAX_STREAM_CHUNK", 4)
        for stop, expected, tokens in cases:
            pieces, stats = [], generation.GenerationStats()
            out = generation.generate(m, PROMPTS[:1], stop=stop, stream=lambda i, t: pieces.append(t), stats=stats, **kw)
            assert out == [expected] and "".join(pieces) == expected, (stop, interval, pieces)
            assert stats.generated_tokens == tokens, (stop, interval)


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0, temperature=1.0), "top_k must be an integer >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=120), r"prompt 0 has 9 tokens; with max_new_tokens=120 it needs 129 positions but the model has 128"),
])
def test_bad_generation_arguments(kw, msg, hf_folder):
    folder, _ = hf_folder("llama3")
    m = jaxaccel.load(folder)
    with pytest.raises(ValueError, match=msg):
        generate_tokens(m, PROMPTS, **kw)
    assert _engine(m).compiled_programs == 0  # rejected before compiling anything


def test_bad_prompts(hf_folder):
    folder, _ = hf_folder("llama3")
    m = jaxaccel.load(folder)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_tokens(m, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_tokens(m, [[1], []])
    with pytest.raises(ValueError, match=r"token id 500 at \[row 0, position 1\]"):
        generate_tokens(m, [[1, 500]])
    with pytest.raises(ValueError, match="no tokenizer"):
        generate_tokens(m, ["text"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        jaxaccel.generate(m, [[1, 2]])
    with pytest.raises(TypeError, match="not a single prompt"):
        generate_tokens(m, [1, 2, 3])


def test_argmax_and_sampling_draw_equal_jax():
    """sampling.argmax (two plain reductions instead of XLA's slow (value, index) one) = jnp.argmax,
    ties, NaN and infinities included; the sampler's Gumbel draw = jax.random.categorical."""
    import jax
    import jax.numpy as jnp

    from jaxaccel.sampling import argmax, rows, sample

    rng = np.random.default_rng(0)
    long_nan = rng.standard_normal((2, 262144))  # XLA's CPU max drops NaN in long rows
    long_nan[0, [7000, 9]] = np.nan
    long_nan[1, [5999, 260000]] = np.nan
    cases = [rng.standard_normal((3, 1000)), rng.integers(0, 3, (4, 50)).astype(float),
             [[1, 3, 3, 2.], [np.nan, 1, np.nan, 5], [-np.inf] * 4, [np.inf, 1, np.inf, 0]],
             long_nan, long_nan[:, :6000]]
    for x in map(lambda a: jnp.asarray(a, jnp.float32), cases):
        np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(x)), np.asarray(jnp.argmax(x, axis=-1)))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(64))
    logits = jnp.asarray(rng.standard_normal((64, 300)), jnp.float32)
    got = sample(logits, keys, rows([(1.0, None, None)] * 64, 300))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.vmap(jax.random.categorical)(keys, logits)))


def test_blocked_draw_matches_softmax():
    """Temperature sampling over many logits (sampling.BLOCKED_DRAW_MIN or more) draws a block by its
    mass, then a token in it: chi-square against the softmax over 8,192 draws, with 6,000 logits
    (12 blocks, the last one padded, each shifted by its own offset so their masses differ): 40
    likely tokens spread over the blocks, one cell each, and the other tokens pooled per block. NaN / +inf logits give the first of them, as argmax."""
    import jax
    import jax.numpy as jnp
    from scipy.stats import chisquare

    V, n, chunk = 6000, 8192, 1024
    assert V >= sampling.BLOCKED_DRAW_MIN and V % sampling.DRAW_BLOCK
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(V) * 0.5 + rng.standard_normal(V // sampling.DRAW_BLOCK + 1)[np.arange(V) // sampling.DRAW_BLOCK]
    hot = rng.choice(V, 40, replace=False)
    logits[hot] += rng.uniform(2.0, 5.0, 40)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    draw = jax.jit(lambda x, keys: sampling.sample(x, keys, sampling.rows([(1.0, None, None)] * len(x), x.shape[1])))
    x = jnp.asarray(np.broadcast_to(logits, (chunk, V)), jnp.float32)
    tokens = np.concatenate([np.asarray(draw(x, jax.vmap(jax.random.PRNGKey)(jnp.arange(c, c + chunk))))
                             for c in range(0, n, chunk)])
    assert tokens.min() >= 0 and tokens.max() < V
    counts = np.bincount(tokens, minlength=V)
    cold = np.ones(V, bool)
    cold[hot] = False
    block = np.arange(V) // sampling.DRAW_BLOCK
    obs = np.concatenate([counts[hot], np.bincount(block[cold], counts[cold])])
    exp = n * np.concatenate([p[hot], np.bincount(block[cold], p[cold])])
    small = exp < 5  # pooled, so the chi-square approximation holds
    obs, exp = np.append(obs[~small], obs[small].sum()), np.append(exp[~small], exp[small].sum())
    assert len(exp) > 40
    stat, pvalue = chisquare(obs, exp)
    assert pvalue > 1e-3, (stat, pvalue)
    for n in (V, 70000):  # XLA's CPU max drops NaN at both lengths (-inf at 6,000, a number at 70,000)
        for bad in (np.nan, np.inf):
            y = np.broadcast_to(np.resize(logits, n), (2, n)).copy()
            y[:, [4321, 5999]] = bad
            y[1, 3] = np.inf  # a NaN comes first whatever else; else the first +inf
            got = draw(jnp.asarray(y, jnp.float32), jax.vmap(jax.random.PRNGKey)(jnp.arange(2)))
            np.testing.assert_array_equal(np.asarray(got), [4321, 4321 if bad != bad else 3])


def test_top_p_full_sort_equals_argsort_draw():
    """The full-sort truncated draw (keys sorted, the drawn rank's id found after) gives the token a stable
    argsort of -logits gives, with ties, -0.0 / 0.0 and -inf; NaN / +inf rows give argmax's."""
    import jax
    import jax.numpy as jnp

    def reference(keys, logits, top_k, top_p, lse):
        index = jnp.argsort(-logits, axis=-1)
        best = jnp.take_along_axis(logits, index, axis=-1)
        rank = sampling._masked_draw(keys, best, top_k, top_p, lse)
        return jnp.take_along_axis(index, rank[:, None], axis=-1)[:, 0]

    def run(draw):
        lse = lambda x: jax.nn.logsumexp(x, axis=-1, keepdims=True)
        return jax.jit(lambda k, x, p, top_k=0: draw(k, x, jnp.full(3, top_k, jnp.int32), jnp.full(3, p), lse(x)))

    new, ref = run(sampling._sorted_draw), run(reference)
    rng = np.random.default_rng(0)
    for trial in range(12):
        x = rng.standard_normal((3, 700)).astype(np.float32) * (0.1, 1.0, 5.0)[trial % 3]
        if trial % 2:
            x = np.round(x * 2) / 2  # many ties
        x[:, :7], x[0, 3], x[1, rng.integers(700, size=20)] = 0.0, -0.0, -np.inf
        keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(trial, trial + 3))
        for top_p in (0.3, 0.9, 1.0):
            for top_k in (0, 5):
                args = (keys, jnp.asarray(x), jnp.float32(top_p), top_k)
                np.testing.assert_array_equal(new(*args), ref(*args))
    negative_nan = np.array(0xFFC00000, np.uint32).view(np.float32)  # its key sorts last; argmax all the same
    x[0, 500], x[1, 600], x[2, 100], x[2, 50] = np.nan, np.inf, negative_nan, -np.inf
    assert new(keys, jnp.asarray(x), jnp.float32(0.9)).tolist() == [500, 600, 100]


@pytest.mark.parametrize("counts", [(6,), (6, 48), (6, 20)])  # flat row: ~40 of 50 tokens
def test_top_p_token_of_a_row_does_not_depend_on_other_rows(counts, monkeypatch):
    """Top-p alone decides among sampling.CANDIDATES tokens when every row's candidates hold
    top_p of the mass, else among the next count's, else sorts all: a peaked row must draw the
    same token beside a flat row (whole batch sorted) as alone (first candidates)."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(sampling, "CANDIDATES", counts)
    rng = np.random.default_rng(1)
    peaked = np.concatenate([[4.0, 3.5, 3.0, 2.5], rng.standard_normal(46) - 8])
    flat = rng.standard_normal(50) * 0.1
    draw = jax.jit(lambda logits, keys: sampling.sample(logits, keys, sampling.rows([(1.0, None, 0.8)] * len(logits), 50)))
    for seed in range(40):
        keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray([seed, seed + 1000]))
        both = draw(jnp.asarray(np.stack([peaked, flat]), jnp.float32), keys)
        alone = draw(jnp.asarray(peaked[None], jnp.float32), keys[:1])
        assert int(both[0]) == int(alone[0]) and int(both[0]) < 4


def test_sampling_settings_are_runtime_values(hf_folder):
    """Greedy, temperature, top-k and top-p of any value run in one compiled program, and a row's
    tokens under one setting equal its tokens when the batch's other rows use other settings."""
    folder, _ = hf_folder("llama3")
    m = jaxaccel.load(folder)
    settings = [dict(temperature=0.0), dict(temperature=0.7, seed=1), dict(temperature=1.3, top_k=5, seed=2),
                dict(temperature=0.9, top_p=0.8, seed=3), dict(temperature=1.1, top_k=40, top_p=0.95, seed=4)]
    solo = [generate_tokens(m, [PROMPTS[0]], max_new_tokens=12, **s)[0] for s in settings]
    assert _engine(m).compiled_programs == 1
    rows = sampling.rows([(s["temperature"], s.get("top_k"), s.get("top_p")) for s in settings], m.config.vocab_size)
    mixed = _engine(m).run([PROMPTS[0]] * len(settings), 12, rows, [s.get("seed", 0) for s in settings],
                           _eos_ids(m))
    eos = set(_eos_ids(m))
    for want, got in zip(solo, mixed):
        got = got.tolist()
        cut = next((j + 1 for j, t in enumerate(got) if t in eos), len(got))
        assert got[:cut] == want
    assert _engine(m).compiled_programs <= 2  # the batch of 5 rows is its own bucket, nothing per setting
