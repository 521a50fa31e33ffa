"""The external baseline row of `jaxaccel accelerate`: transformers (PyTorch, eager attention,
float32) on the same weights, exported with `Model.save_hf` to a temporary folder, measured in the
same run by the same quality code (accelerate_measure.py) through small adapters that have a
Model's `logits` / `embed` / `classify`. It is a point of comparison, never a choice. Without
torch (or for a quantized or sharded source, whose weights transformers would not share) the row
says why it was not measured."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from . import accelerate_measure as measure
from .accelerate_measure import NotMeasured

NAME = "transformers eager"
__all__ = ["NAME", "NotMeasured", "transformers_baseline"]


def _torch_batches(tok, items: list, batch: int, max_len: int):
    """(indices, tokenized batch) of texts, and of (text, text_pair) pairs apart: one call cannot mix them."""
    for want_pair in (False, True):
        idx = [i for i, t in enumerate(items) if isinstance(t, tuple) == want_pair]
        for s in range(0, len(idx), batch):
            part = [items[i] for i in idx[s:s + batch]]
            args = ([a for a, _ in part], [b for _, b in part]) if want_pair else (part,)
            yield idx[s:s + batch], tok(*args, padding=True, truncation=True, max_length=max_len, return_tensors="pt")


class _Torch:
    """A transformers model behind the Model methods the quality and speed code calls."""

    def __init__(self, hf, model):
        self.hf, self.tokenizer, self.labels = hf, model.tokenizer, model.config.labels
        from .encoder_tasks import max_length

        self.max_len = max_length(model) if not model.config.causal else None
        self.params_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())

    def logits(self, ids):
        import torch

        with torch.no_grad():
            return self.hf(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()

    def _run(self, items, batch, fn):
        import torch

        out = [None] * len(items)
        with torch.no_grad():
            for idx, enc in _torch_batches(self.tokenizer, items, batch, self.max_len):
                for i, v in zip(idx, fn(enc)):
                    out[i] = v
        return out

    def embed(self, texts, batch_size: int = 32, **_):
        def pooled(enc):  # mean over real tokens, unit norm: as encoder_tasks.embed
            h = self.hf(**enc).last_hidden_state.float().numpy()
            mask = enc["attention_mask"].numpy()[..., None]
            v = (h * mask).sum(1) / mask.sum(1)
            return v / np.linalg.norm(v, axis=-1, keepdims=True)

        return np.stack(self._run(list(texts), batch_size, pooled))

    def classify(self, items, batch_size: int = 32, **_):
        def top(enc):
            import torch

            p = torch.softmax(self.hf(**enc).logits.float(), -1).numpy()
            return [(self.labels[int(c)], float(r[c])) for r, c in zip(p, p.argmax(-1))]

        return self._run(list(items), batch_size, top)


def _generate_speed(hf, model, prompt: str, batch: int, new_tokens: int, repeats: int) -> dict:
    """Greedy `generate` of transformers: time to first token (a 1-token call) and decode tokens/s."""
    import torch

    ids = torch.as_tensor([list(model.tokenizer(prompt)["input_ids"])] * batch, dtype=torch.long)
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0  # only silences generate()'s warning: no row is padded

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t

    run(2)  # warm up
    first = float(np.median([run(1) for _ in range(repeats)]))
    totals = [run(new_tokens) for _ in range(repeats)]
    return {"compile_s": 0.0, "ttft_s": first,
            "decode_tok_s": batch * max(new_tokens - 1, 1) / max(min(totals) - first, 1e-9),
            "latency_p50_s": float(np.percentile(totals, 50)), "latency_p90_s": float(np.percentile(totals, 90))}


def transformers_baseline(model, ref) -> dict:
    """The row's params_bytes, quality and speed (and predictions for classify), measured on
    `ref` (accelerate.Reference: the task, its data and float32's outputs)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise NotMeasured("not measured: torch / transformers are not installed (pip install torch transformers)") from None
    if model.quant is not None or model.dtype != "float32" or model.mesh is not None:
        raise NotMeasured("not measured: the source is quantized, not float32 or sharded; transformers would run other weights")
    auto = {"generate": transformers.AutoModelForCausalLM, "embed": transformers.AutoModel,
            "classify": transformers.AutoModelForSequenceClassification}[ref.task]
    with tempfile.TemporaryDirectory(prefix="jaxaccel-hf-") as folder:
        model.save_hf(folder)
        hf = auto.from_pretrained(folder, dtype="float32", attn_implementation="eager").eval()
    t = _Torch(hf, model)
    sizes = ref.batch_sizes
    row = {"params_bytes": int(t.params_bytes),
           "external": f"transformers {transformers.__version__} on torch {torch.__version__}, float32, eager attention"}
    if ref.task == "generate":
        row["quality"] = measure.lm_quality(ref.ref, t, ref.windows)
        row["speed"] = {str(b): _generate_speed(hf, model, ref.prompt, b, ref.new_tokens, ref.repeats) for b in sizes}
    elif ref.task == "embed":
        row["quality"] = measure.encoder_quality(ref.ref, t, ref.sentences)[0]
        row["speed"] = {str(b): measure.encoder_speed(t, ref.sentences, b, ref.repeats) for b in sizes}
    else:
        row["quality"], row["predictions"] = measure.classify_quality(t, ref.items, ref.gold, ref.ref, sizes[0])
        row["speed"] = {str(b): measure.classify_speed(t, ref.items, b, ref.repeats) for b in sizes}
    return row
