"""What `jaxaccel accelerate` measures of one variant: speed (warm, per batch size), quality against
float32 (language models: next-token KL, top-1, perplexity on the held-out text; embeddings: cosine;
classifiers: accuracy on the user's labelled `--eval` rows) and the process's peak memory.

The functions take anything with a Model's methods (`logits`, `embed`, `classify`), so the external
transformers baseline (accelerate_baseline.py) is measured by the same code where it can be.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class NotMeasured(ValueError):
    """An external baseline that does not apply here (no torch, no llama-server, not a GGUF ...);
    its message is the row's reason."""


def check_task(model, task: str) -> None:
    """Refuse a task the model cannot do, before anything is measured."""
    cfg = model.config
    if task == "generate" and cfg.head != "causal_lm":
        raise ValueError(f"--task generate needs a decoder LM; this {cfg.family} model has a {cfg.head!r} head "
                         "(use --task embed or --task classify)")
    if task in ("embed", "classify") and cfg.causal:
        raise ValueError(f"--task {task} needs a BERT encoder; {cfg.family} is a decoder LM (use --task generate)")
    if task == "classify":
        if cfg.head != "classifier":
            raise ValueError(f"--task classify needs a sequence classifier (a BertForSequenceClassification folder, "
                             f"e.g. from `jaxaccel finetune --task classify`); this model has a {cfg.head!r} head")
        if cfg.problem_type not in (None, "single_label_classification") or len(cfg.labels) < 2:
            raise ValueError("--task classify measures accuracy, which needs a single-label classifier of >= 2 "
                             f"classes; this one is {cfg.problem_type or 'single-label'} with {len(cfg.labels)} label(s)")


# -- peak memory ----------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """The process's resident-set high-water mark over a `with` block, in bytes (`.peak`, and
    `.start`, the resident set when the block began). Linux: the kernel's own VmHWM, reset at the
    start by writing 5 to /proc/self/clear_refs, so nothing between samples is missed (method
    "vmhwm"). Elsewhere a thread samples the resident set every 5 ms (method "sampled": a shorter
    spike can be missed). The figure is the whole process's: the float32 model the variants are
    made from is resident too, so compare variants by their peaks, not by the absolute value alone.
    The reset is the process's: its ru_maxrss afterwards counts from the last reset, not from start-up."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "vmhwm" if _status_kib("VmHWM") is not None else "sampled"
        except OSError:
            self.method = "sampled"
        # read after the reset: the mark restarts at the resident set then, and read before it a
        # set that shrank in between (another thread freeing) would sit above the peak
        self.start = int(self._proc.memory_info().rss)
        self._stop, self._max = threading.Event(), self.start
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, int(self._proc.memory_info().rss))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.method == "sampled":
            self._thread.join()
            self.peak = max(self._max, int(self._proc.memory_info().rss))
        else:
            # never below the start: the kernel's per-CPU RSS counters are approximate, so VmHWM
            # and the start's RSS (two reads) can disagree by a few dozen pages (seen in CI)
            self.peak = max(1024 * _status_kib("VmHWM"), self.start)

    def as_dict(self) -> dict:
        return {"peak_rss_bytes": self.peak, "start_rss_bytes": self.start, "method": self.method}


# -- language models ------------------------------------------------------------------------------

def lm_windows(tokenizer, text: str, window: int, n: int) -> np.ndarray:
    """[<= n, window] token ids: BOS + window - 1 held-out tokens each."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    body = window - 1
    rows = [ids[i * body:(i + 1) * body] for i in range(min(n, len(ids) // body))]
    if not rows:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {window}")
    return np.asarray([[tokenizer.bos_token_id, *r] for r in rows], np.int32)


def int8_cache(model) -> bool:
    return getattr(model, "quant", None) is not None and model.quant.kv_cache_int8


def through_cache(model):
    """`tokens [1, T] -> logits` through a KV cache of the model's own dtype, as generation runs:
    an int8 cache's rounding reaches the attention then (every position reads the keys and values
    back from the cache), which `Model.logits` (no cache) never shows."""
    import jax

    from .kv_cache import init_cache

    def run(params, tokens):
        cache = init_cache(model.config, 1, tokens.shape[1], model.cache_dtype)
        return model.module.apply({"params": params}, tokens, cache=cache).logits

    jitted = jax.jit(run)
    return lambda row: jitted(model.params, row)


def log_probs(model, row: np.ndarray, logits_fn=None) -> np.ndarray:
    """float64 [T - 1, V] next-token log-probabilities of one window (`logits_fn`: `through_cache`'s,
    else `Model.logits`)."""
    import jax

    logits = np.asarray((logits_fn or model.logits)(row[None])[0, :-1], np.float32)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def non_finite(what: str, bad: int, total: int) -> dict:
    """The quality of a variant whose outputs hold inf or NaN (float16 overflowing, say): every
    figure null (JSON has no NaN) and `non_finite`, the reason the choice rejects it for."""
    return {"non_finite": f"non-finite {what} (inf or NaN) at {bad} of {total} held-out positions"}


def lm_quality(ref_logp: list[np.ndarray], model, windows: np.ndarray) -> dict:
    """KL(float32 || variant) of each next-token distribution, top-1 agreement, perplexity change;
    non-finite logits anywhere: `non_finite` instead (no figure means anything then). A model with
    an int8 KV cache is scored through that cache (`through_cache`)."""
    fn = through_cache(model) if int8_cache(model) else None
    logps = [log_probs(model, row, fn) for row in windows]
    bad = sum(int(np.sum(~np.isfinite(lp).all(-1))) for lp in logps)
    if bad:
        return non_finite("logits", bad, sum(len(lp) for lp in logps))
    kls, agree, nll, nll_ref, n = [], 0, 0.0, 0.0, 0
    for ref, row, logp in zip(ref_logp, windows, logps):
        kls.append(np.sum(np.exp(ref) * (ref - logp), axis=-1))
        agree += int(np.sum(ref.argmax(-1) == logp.argmax(-1)))
        nxt = row[1:]
        nll -= float(np.sum(logp[np.arange(len(nxt)), nxt]))
        nll_ref -= float(np.sum(ref[np.arange(len(nxt)), nxt]))
        n += len(nxt)
    kl = np.maximum(np.concatenate(kls), 0.0)  # >= 0 exactly; float64 rounding gives -1e-9 for equal distributions
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "top1_agreement": agree / n,
            "ppl": math.exp(nll / n), "ppl_delta_pct": 100.0 * (math.exp((nll - nll_ref) / n) - 1.0)}


def lm_speed(model, prompt: str, batch: int, new_tokens: int, repeats: int, speculative: str | None = None,
             eager: bool = False) -> tuple[dict, str]:
    """-> (the speed figures, the greedy continuation of `prompt`: what a folder of this variant must reproduce)."""
    from .generation import GenerationStats, generate

    if eager:  # no cache, no jit: each token runs the whole sequence op by op
        import jax

        prompt_ids = list(model.tokenizer(prompt)["input_ids"])
        ids = list(prompt_ids)
        t0 = time.perf_counter()
        with jax.disable_jit():
            for i in range(new_tokens):
                ids.append(int(np.argmax(np.asarray(model.logits(np.asarray([ids] * batch)))[0, -1])))
                if i == 0:
                    first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        rate = batch * max(new_tokens - 1, 1) / max(total - first, 1e-9)
        return ({"compile_s": 0.0, "ttft_s": first, "decode_tok_s": rate, "latency_p50_s": total, "latency_p90_s": total},
                model.tokenizer.decode(ids[len(prompt_ids):]))
    run = lambda stats: generate(model, [prompt] * batch, max_new_tokens=new_tokens, stats=stats,
                                 speculative=speculative)
    t0 = time.perf_counter()
    text = run(GenerationStats())[0]
    first_call = time.perf_counter() - t0
    stats = []
    for _ in range(repeats):
        s = GenerationStats()
        run(s)
        stats.append(s)
    totals = [s.total_time for s in stats]
    best = min(stats, key=lambda s: s.total_time)
    return ({"compile_s": max(first_call - min(totals), 0.0), "ttft_s": float(np.median([s.time_to_first_token for s in stats])),
             "decode_tok_s": best.decode_tokens_per_s, "latency_p50_s": float(np.percentile(totals, 50)),
             "latency_p90_s": float(np.percentile(totals, 90))}, text)


# -- encoders -------------------------------------------------------------------------------------

def heldout_sentences(text: str) -> list[str]:
    """The held-out text's sentences (embedded truncated to the model's max length, as classify's rows are)."""
    return [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 3]


def encoder_quality(ref: np.ndarray | None, model, texts: list[str]) -> tuple[dict, np.ndarray]:
    """Cosine of each embedding with float32's (`ref`; None: these are float32's), and the embeddings."""
    got = model.embed(texts, truncate=True)
    if bad := int(np.sum(~np.isfinite(got).all(-1))):
        return non_finite("embeddings", bad, len(got)), got
    ref = got if ref is None else ref
    cos = np.sum(ref * got, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}, got


def timed(fn, n_items: int, repeats: int) -> dict:
    """One call to compile (or warm up), then `repeats` timed ones: items/s of the best."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"compile_s": max(first - min(times), 0.0), "sentences_s": n_items / min(times),
            "latency_p50_s": float(np.percentile(times, 50)), "latency_p90_s": float(np.percentile(times, 90))}


def encoder_speed(model, texts: list[str], batch: int, repeats: int) -> dict:
    return timed(lambda: model.embed(texts, batch_size=batch, truncate=True), len(texts), repeats)


# -- classifiers: accuracy on labelled rows --------------------------------------------------------

@dataclass(frozen=True)
class LabelledRows:
    """--eval's rows: `items` (a text, or a (text, text_pair) pair), `labels` as given (a class
    name or an index), `source` (the file, for messages)."""

    items: list
    labels: list
    source: str

    def where(self, i: int) -> str:
        return f"{self.source} line {i + 1}"


def read_eval(path) -> LabelledRows:
    """A JSONL file of {"text": ..., "label": ...} rows (optionally "text_pair"); any row without
    a usable label is an error naming its line (accuracy needs every row labelled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--eval file {path} not found")
    items, labels = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--eval {path} line {n} is not valid JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"--eval {path} line {n}: each row must be an object with a \"text\" string")
        label = row.get("label")
        if not (isinstance(label, str) and label) and not (isinstance(label, int) and not isinstance(label, bool)):
            raise ValueError(f"--eval {path} line {n} has no \"label\" (a class name or index): accuracy needs "
                             "labelled rows, {\"text\": ..., \"label\": ...}")
        pair = row.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise ValueError(f"--eval {path} line {n}: \"text_pair\" must be a string")
        items.append(row["text"] if not pair else (row["text"], pair))
        labels.append(label)
    if not items:
        raise ValueError(f"--eval {path} has no rows")
    return LabelledRows(items, labels, str(path))


def label_names(rows: LabelledRows, model_labels) -> list[str]:
    """Each row's label as one of the model's label names; an unknown one is an error naming its row."""
    names = list(model_labels)
    out = []
    for i, label in enumerate(rows.labels):
        if isinstance(label, str) and label in names:
            out.append(label)
        elif isinstance(label, int) and 0 <= label < len(names):
            out.append(names[label])
        else:
            raise ValueError(f"--eval {rows.where(i)}: label {label!r} is not one of the model's labels {names} "
                             f"(or an index below {len(names)})")
    return out


def predict(model, items: list, batch: int) -> tuple[list[str], int]:
    """-> each row's label, and how many rows scored non-finite (their label means nothing)."""
    out = model.classify(items, batch_size=batch, truncate=True)
    return [label for label, _ in out], sum(not math.isfinite(score) for _, score in out)


def classify_quality(model, items: list, gold: list[str], ref: list[str] | None, batch: int) -> tuple[dict, list]:
    """(accuracy, drop vs float32 in points, agreement with float32's labels), and the predictions."""
    got, bad = predict(model, items, batch)
    if bad:
        return non_finite("class scores", bad, len(got)), got
    acc = float(np.mean([g == p for g, p in zip(gold, got)]))
    ref_acc = acc if ref is None else float(np.mean([g == p for g, p in zip(gold, ref)]))
    agreement = 1.0 if ref is None else float(np.mean([r == p for r, p in zip(ref, got)]))
    return {"accuracy": acc, "accuracy_drop_points": 100.0 * (ref_acc - acc), "agreement": agreement}, got


def classify_speed(model, items: list, batch: int, repeats: int) -> dict:
    return timed(lambda: model.classify(items, batch_size=batch, truncate=True), len(items), repeats)
