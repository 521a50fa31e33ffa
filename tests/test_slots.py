"""The continuous-batching device programs in-process (slots.py) on a tiny random Gemma 3 with a
character tokenizer: what the server's tests see through HTTP, checked here call by call."""

from __future__ import annotations

import numpy as np
import pytest

import jaxaccel
from jaxaccel.generation import _eos_ids

from conftest import random_hf_model, tiny_hf_config
from serve_util import write_char_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyslots")
    random_hf_model(tiny_hf_config("gemma3")).save_pretrained(path)
    write_char_tokenizer(path)
    return jaxaccel.load(path)


def test_verify_program_keeps_agreeing_drafts_and_rolls_back_the_rest(model):
    """In-process SlotEngine: a verify call keeps a row's drafts up to the first one the model
    disagrees with plus the model's own token, rolls the rest back out of the cache (the next
    steps continue plain decoding), cuts at max_tokens, and gives a row without drafts the token a
    plain step samples (a seeded row's tokens stay generate's); the draft count compiles nothing."""
    from jaxaccel.sampling import rows
    from jaxaccel.slots import SlotEngine

    V = model.config.vocab_size
    eng = SlotEngine(model, slots=2, context=64, eos=_eos_ids(model))
    ids = [list(model.tokenizer(p)["input_ids"]) for p in ("12345", "Once upon a time")]
    want = [jaxaccel.generate_tokens(model, [ids[0]], max_new_tokens=16)[0],
            jaxaccel.generate_tokens(model, [ids[1]], max_new_tokens=16, temperature=0.9, seed=4)[0]]
    assert all(len(w) == 16 for w in want)  # no EOS in them
    got = [[], []]
    for slot, (settings, seed) in enumerate((((0.0, None, None), 0), ((0.9, None, None), 4))):
        got[slot] += eng.prefill(slot, ids[slot], seed, 16, rows([settings], V), False).tokens[0].tolist()
    wrong = lambda t: (t + 1) % V
    live, release = [0, 1], np.zeros((2,), bool)

    def verify(drafts):
        out, accepted = eng.verify(drafts, release, live)
        for slot in live:
            got[slot] += out.tokens[slot][out.valid[slot]].tolist()
        return accepted.tolist()

    assert verify({0: want[0][1:4] + [wrong(want[0][4])]}) == [3, 0]  # 3 agree: they and the model's 4th
    assert got == [want[0][:5], want[1][:2]]
    assert verify({0: [wrong(want[0][5]), want[0][6], want[0][7]]}) == [0, 0]  # the first disagrees: none kept
    assert got == [want[0][:6], want[1][:3]]
    out = eng.decode(4, release, live)  # after the rollback plain decoding goes on as before
    for slot in live:
        got[slot] += out.tokens[slot][out.valid[slot]].tolist()
    assert got == [want[0][:10], want[1][:7]]
    assert verify({0: want[0][10:14]}) == [4, 0]  # all 4 agree: they and the model's 5th
    assert got == [want[0][:15], want[1][:8]]
    assert verify({0: want[0][15:16] + [0, 0]})[0] >= 1  # max_tokens: one more token, then done
    assert got == [want[0], want[1][:9]] and eng.done().tolist() == [True, False]
    assert eng.compiled_programs == 4  # two prompt buckets, the decode, and the verify of K = 4 (drafts 1 .. 4)
