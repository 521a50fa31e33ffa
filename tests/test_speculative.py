"""Speculative decoding (prompt lookup): token-for-token equal to plain greedy decoding, the KV
cache rolled back past rejected drafts, adaptive k, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import jaxaccel
from conftest import FAMILY_KINDS
from jaxaccel import cli, generation, sampling, speculative
from jaxaccel.generation import GenerationStats, _speculator, generate, generate_tokens
from jaxaccel.kv_cache import init_cache


def repetitive_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Rows of different lengths; the first two repeat spans, so prompt lookup finds drafts."""
    rng = np.random.default_rng(seed)
    span = rng.integers(3, vocab - 1, 11).tolist()
    return [span * 3, span[:6] + [5, 6] + span[:6], rng.integers(3, vocab - 1, 4).tolist()]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("drafter", ["prompt_lookup", "self:int8"])
def test_greedy_tokens_equal_plain_decoding_for_every_family(hf_folder, kind, drafter):
    m = jaxaccel.load(hf_folder(kind)[0])
    prompts = repetitive_prompts(m.config.vocab_size)
    stats = GenerationStats()
    got = generate_tokens(m, prompts, max_new_tokens=40, speculative=drafter, stats=stats)
    assert got == generate_tokens(m, prompts, max_new_tokens=40)
    s = stats.speculative
    assert s.drafted > 0 and s.calls < sum(map(len, got))  # drafting happened, fewer calls than tokens
    if drafter == "self:int8":  # the int8 copy agrees with float32 on most tokens of these tiny models
        assert s.acceptance_rate > 0.5, s


def test_a_draft_model_drafts_when_it_shares_the_tokenizer(hf_folder):
    """Any Model with the target's vocabulary drafts (here another random model of the family:
    few drafts accepted, the same tokens all the same); another vocabulary is refused."""
    from conftest import random_hf_model, tiny_hf_config

    m = jaxaccel.load(hf_folder("llama3")[0])
    draft = jaxaccel.load(hf_folder("llama_tied")[0])
    prompts = repetitive_prompts(m.config.vocab_size)
    stats = GenerationStats()
    assert generate_tokens(m, prompts, max_new_tokens=24, speculative=draft, stats=stats) == \
        generate_tokens(m, prompts, max_new_tokens=24)
    assert stats.speculative.drafted > 0
    cfg = tiny_hf_config("qwen2")
    cfg.vocab_size = 120
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        random_hf_model(cfg).save_pretrained(d)
        other = jaxaccel.load(d)
    with pytest.raises(ValueError, match="its vocabulary has 120 tokens and the target's 97"):
        generate_tokens(m, prompts, speculative=other)


def test_text_with_stop_strings_and_streaming_equals_plain(tmp_path):
    from conftest import make_hf_model
    from gguf_util import write_tiny_gguf

    m = jaxaccel.load(write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "t.gguf", qtype="Q8_0"))
    prompts = ["a b c a b c a b", "hello world hello"]
    plain = generate(m, prompts, max_new_tokens=24)
    pieces = {0: [], 1: []}
    spec = generate(m, prompts, max_new_tokens=24, speculative="prompt_lookup",
                    stream=lambda i, text: pieces[i].append(text))
    assert spec == plain and ["".join(pieces[i]) for i in (0, 1)] == plain
    stop = plain[0][len(plain[0]) // 2:][:3]
    assert generate(m, prompts, max_new_tokens=24, stop=[stop], speculative="prompt_lookup") == \
        generate(m, prompts, max_new_tokens=24, stop=[stop])


def test_rejected_drafts_are_rolled_back_out_of_the_cache(hf_folder):
    """A verify call whose drafts are all wrong advances each row's cache by its one real token:
    the next step's logits equal a fresh run over the real tokens alone."""
    m = jaxaccel.load(hf_folder("llama3")[0])
    spec = _speculator(m)
    prompt = [3, 14, 15, 92, 65]
    cache = init_cache(m.config, 1, 32, m.cache_dtype)
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :5] = prompt
    greedy = sampling.rows([(0.0, None, None)], m.config.vocab_size)
    seeds, steps = np.zeros((1,), np.int32), np.ones((1,), np.int32)
    first, cache = spec._prefill(m.params, tokens, np.asarray([5], np.int32), cache, seeds, greedy)
    first = int(np.asarray(first)[0])
    after = int(np.argmax(np.asarray(m.logits(np.asarray([prompt + [first]])))[0, -1]))  # the model's next token
    wrong = [t for t in range(m.config.vocab_size) if t != after][:4]  # drafts it rejects at once
    block = np.asarray([[first, *wrong]], np.int32)
    pred, accepted, cache = spec.verify_fn(4)(m.params, cache, block, np.asarray([4], np.int32), seeds, steps, greedy)
    assert int(np.asarray(accepted)[0]) == 0 and int(np.asarray(cache["index"])[0]) == 6
    nxt = int(np.asarray(pred)[0, 0])
    out = spec.module.apply({"params": m.params}, np.asarray([[nxt]], np.int32), cache=cache)
    fresh = np.asarray(m.logits(np.asarray([prompt + [first, nxt]])))[0, -1]
    np.testing.assert_allclose(np.asarray(out.logits)[0, 0], fresh, atol=2e-5, rtol=0)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = speculative.PromptLookup(max_ngram=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # the 2-gram (2, 3) matched
    assert d.propose([1, 2, 3, 7, 1, 2, 3, 8, 2, 3], 2) == [8, 2]  # the most recent match wins
    assert d.propose([5, 6, 7], 4) == []  # nothing repeats
    assert d.propose([4, 4, 4, 4], 2) == [4]  # only what exists after the match
    with pytest.raises(ValueError, match="1 <= min_ngram <= max_ngram"):
        speculative.PromptLookup(max_ngram=0)


def test_k_adapts_to_the_acceptance_rate():
    a = speculative.AdaptiveK(start=4)
    a.update(4, 4)
    assert a.next() == 8
    a.update(8, 0)
    assert a.next() == 4
    for _ in range(speculative.AdaptiveK.REST):
        a.update(4, 0)
    ks = [a.next() for _ in range(speculative.AdaptiveK.REST)]
    assert ks.count(0) == speculative.AdaptiveK.REST - 1 and ks[-1] > 0  # rests, then looks again


def test_bad_speculative_arguments_are_clear_errors(hf_folder):
    m = jaxaccel.load(hf_folder("llama3")[0])
    with pytest.raises(ValueError, match="unknown speculative drafter 'ngram'; choose one of prompt_lookup"):
        generate_tokens(m, [[1, 2, 3]], speculative="ngram")
    with pytest.raises(ValueError, match="unknown speculative drafter 'self:int3'"):
        generate_tokens(m, [[1, 2, 3]], speculative="self:int3")


def test_cli_prints_the_acceptance(tmp_path, capsys, monkeypatch):
    from conftest import make_hf_model
    from gguf_util import write_tiny_gguf

    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "c"))
    gguf = write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "t.gguf", qtype="Q8_0")
    assert cli.main(["generate", "a b c a b c a b c", "--model", str(gguf), "--max-new-tokens", "12",
                     "--speculative", "prompt_lookup"]) == 0
    err = capsys.readouterr().err
    assert "speculative (prompt_lookup):" in err and "tokens per forward call" in err
    for spec in ("self:int8", f"draft:{gguf}"):  # the model itself, quantized / loaded again as the draft
        assert cli.main(["generate", "a b c a b c a b c", "--model", str(gguf), "--max-new-tokens", "12",
                         "--speculative", spec]) == 0
        out, err = capsys.readouterr()
        assert f"speculative ({spec}):" in err
    assert cli.main(["generate", "x", "--model", str(gguf), "--speculative", "draft:/no/such/model"]) == 2


def test_speculative_decoding_on_a_mesh_is_refused(hf_folder):
    import dataclasses

    m = dataclasses.replace(jaxaccel.load(hf_folder("llama3")[0]), mesh=object())  # any mesh: refused first
    with pytest.raises(ValueError, match="speculative decoding on a device mesh is not supported yet"):
        generate_tokens(m, [[1, 2, 3]], speculative="prompt_lookup")


@pytest.mark.parametrize("top_k,top_p", [(None, None), (6, None), (None, 0.7)])
def test_speculative_sampling_follows_the_target_distribution(top_k, top_p):
    """sampling.speculative_accept: the first emitted token follows the target's truncated
    distribution p_0 whatever the draft proposes (chi-square over 8,192 keys): the most likely
    token, a middling one, and one outside the truncated set (disagreeing on purpose: always
    rejected). The second token, given the first draft accepted, follows p_1."""
    import jax
    import jax.numpy as jnp
    from scipy.stats import chisquare

    from jaxaccel import sampling

    V, n, temperature = 40, 8192, 0.8
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, V)).astype(np.float32) * 1.5  # positions 0, 1, 2 (k = 2 drafts)
    rs1 = sampling.rows([(temperature, top_k, top_p)], V)
    p = np.asarray(jax.nn.softmax(sampling.truncated_logits(jnp.asarray(logits), sampling.RowSampling(
        *(np.repeat(a, 3) for a in rs1))), axis=-1), np.float64)
    order = np.argsort(-p[0])
    outside = int(np.flatnonzero(p[0] == 0)[0]) if (p[0] == 0).any() else int(order[-1])
    accept = jax.jit(lambda keys, drafts: sampling.speculative_accept(
        jnp.broadcast_to(jnp.asarray(logits), (n, 3, V)), drafts, jnp.full((n,), 2, jnp.int32), keys,
        sampling.RowSampling(*(np.repeat(a, n) for a in rs1))))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))

    def check(observed, probs):
        support = probs > 0
        assert observed[~support].sum() == 0, "drew a token outside the truncated set"
        exp, obs = observed.sum() * probs[support] / probs[support].sum(), observed[support]
        small = exp < 5
        if small.any():  # pooled, so the chi-square approximation holds
            exp, obs = np.append(exp[~small], exp[small].sum()), np.append(obs[~small], obs[small].sum())
        assert chisquare(obs, exp).pvalue > 1e-3

    for first_draft in (int(order[0]), int(order[2]), outside):
        drafts = jnp.tile(jnp.asarray([[first_draft, int(order[1])]], jnp.int32), (n, 1))
        tokens, accepted = map(np.asarray, accept(keys, drafts))
        check(np.bincount(tokens[:, 0], minlength=V), p[0])
        if first_draft == outside and p[0, outside] == 0:
            assert (accepted == 0).all()
        kept = accepted >= 1
        if kept.sum() > 500:
            check(np.bincount(tokens[kept, 1], minlength=V), p[1])


def test_sampled_speculative_generation_is_seeded_and_uses_the_fused_loop_when_resting(hf_folder):
    """Sampling with a drafter: the same seed gives the same tokens, another seed other tokens;
    a prompt the drafter cannot help with rests in the fused loop of REST steps and still
    produces max_new_tokens (greedy: equal to plain decoding)."""
    m = jaxaccel.load(hf_folder("llama3")[0])
    prompt = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]]
    for drafter in ("prompt_lookup", "self:int8"):
        run = lambda seed: generate_tokens(m, prompt, max_new_tokens=40, temperature=0.9, top_k=20, seed=seed,
                                           speculative=drafter)
        a, b, c = run(1), run(1), run(2)
        assert a == b and a != c and len(a[0]) >= 1
    class Never:  # a drafter with no guesses: drafting rests, the fused loop runs
        def propose(self, tokens, k):
            return []

    stats = speculative.SpeculativeStats()
    prompt = [list(range(3, 30, 3))]
    plain = generate_tokens(m, prompt, max_new_tokens=100)
    eos = generation._eos_ids(m)
    assert _speculator(m).run(prompt, 100, eos, Never(), stats=stats) == plain
    assert stats.drafted == 0 and stats.calls > 60  # REST plain steps per fused call


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gemma_greedy_text_equals_plain_with_each_drafter():
    """The embedded Gemma 3 270M, rows of different lengths, with and without a stop string:
    prompt lookup and the int8 self-draft give plain greedy decoding's text."""
    m = jaxaccel.load("gemma3-270m")
    passage = ("The old mill by the river was built in 1852. The old mill by the river ground wheat for the "
               "village until 1931, when the river changed its course.")
    prompts = [passage + " Summary: The old mill", "The capital of France is"]
    plain = generate(m, prompts, max_new_tokens=32)
    stop = plain[0][10:14]
    for drafter in ("prompt_lookup", "self:int8"):
        assert generate(m, prompts, max_new_tokens=32, speculative=drafter) == plain
        assert generate(m, prompts, max_new_tokens=32, stop=[stop], speculative=drafter) == \
            generate(m, prompts, max_new_tokens=32, stop=[stop])
