"""Speculative decoding (prompt lookup): token-for-token equal to plain greedy decoding, the KV
cache rolled back past rejected drafts, adaptive k, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import jaxaccel
from conftest import FAMILY_KINDS
from jaxaccel import cli, speculative
from jaxaccel.generation import GenerationStats, _speculator, generate, generate_tokens
from jaxaccel.kv_cache import init_cache


def repetitive_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Rows of different lengths; the first two repeat spans, so prompt lookup finds drafts."""
    rng = np.random.default_rng(seed)
    span = rng.integers(3, vocab - 1, 11).tolist()
    return [span * 3, span[:6] + [5, 6] + span[:6], rng.integers(3, vocab - 1, 4).tolist()]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_greedy_tokens_equal_plain_decoding_for_every_family(hf_folder, kind):
    m = jaxaccel.load(hf_folder(kind)[0])
    prompts = repetitive_prompts(m.config.vocab_size)
    stats = GenerationStats()
    got = generate_tokens(m, prompts, max_new_tokens=40, speculative="prompt_lookup", stats=stats)
    assert got == generate_tokens(m, prompts, max_new_tokens=40)
    s = stats.speculative
    assert s.drafted > 0 and s.calls < sum(map(len, got))  # drafting happened, fewer calls than tokens


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
    logits, cache = spec._prefill(m.params, tokens, np.asarray([5], np.int32), cache)
    first = int(np.argmax(np.asarray(logits)[0]))
    wrong = [(first + 1 + j) % m.config.vocab_size for j in range(4)]
    block = np.asarray([[first, *wrong]], np.int32)
    pred, accepted, cache = spec.verify_fn(4)(m.params, cache, block, np.asarray([4], np.int32))
    if int(np.asarray(pred)[0, 0]) == wrong[0]:  # the model happened to agree with the first draft
        pytest.skip("the drafts were meant to be wrong")
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
    with pytest.raises(ValueError, match="exact for greedy decoding .* pass temperature=0"):
        generate_tokens(m, [[1, 2, 3]], temperature=0.7, speculative="prompt_lookup")


def test_cli_prints_the_acceptance(tmp_path, capsys, monkeypatch):
    from conftest import make_hf_model
    from gguf_util import write_tiny_gguf

    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "c"))
    gguf = write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "t.gguf", qtype="Q8_0")
    assert cli.main(["generate", "a b c a b c a b c", "--model", str(gguf), "--max-new-tokens", "12",
                     "--speculative", "prompt_lookup"]) == 0
    err = capsys.readouterr().err
    assert "speculative (prompt_lookup):" in err and "tokens per forward call" in err


def test_speculative_decoding_on_a_mesh_is_refused(hf_folder):
    import dataclasses

    m = dataclasses.replace(jaxaccel.load(hf_folder("llama3")[0]), mesh=object())  # any mesh: refused first
    with pytest.raises(ValueError, match="speculative decoding on a device mesh is not supported yet"):
        generate_tokens(m, [[1, 2, 3]], speculative="prompt_lookup")
