"""Training data: JSONL / plain-text loaders, tokenization, padding or packing, seeded order.

Row kinds (one JSON object per line): {"prompt", "completion"} (SFT: loss on the completion
only), {"text", "label"} (classification), {"text"} (causal LM on every token, or masked
LM). A plain-text file gives one {"text"} row per non-empty line.

The batch order is a pure function of (seed, position): position p is batch p of an endless
stream of per-epoch permutations. A checkpoint stores the position, so a resumed run sees
exactly the next batch the interrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CAUSAL_TASKS = ("sft",)
TASKS = ("sft", "classify", "mlm")


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0  # rows cut to the max length (only with truncate=True)
    tokens: int = 0  # real tokens after truncation
    slots: int = 0  # tokens + padding

    @property
    def fill(self) -> float:
        return self.tokens / max(self.slots, 1)


def read_rows(source) -> tuple[list[dict], list[str]]:
    """A .jsonl path, a plain-text path, or an in-memory list of dicts / strings ->
    (rows, where) with where[i] naming row i's origin (file and line number) for errors."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found")
        rows, where = [], []
        jsonl = path.suffix in (".jsonl", ".ndjson", ".json")  # one JSON object per line
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not valid JSON ({e}); fix or delete that line") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path} line {n}: expected a JSON object like {{\"text\": ...}}, "
                                     f"got {type(obj).__name__}")
            else:
                obj = {"text": line}
            rows.append(obj)
            where.append(f"{path} line {n}")
        if not rows:
            raise ValueError(f"data file {path} holds no rows")
        return rows, where
    rows = [{"text": r} if isinstance(r, str) else r for r in source]
    if not rows:
        raise ValueError("no training rows given")
    return rows, [f"row {i + 1}" for i in range(len(rows))]


def _need(row: dict, keys: Sequence[str], where: str, task: str):
    for k in keys:
        if k not in row:
            raise ValueError(f"{where}: task {task!r} needs keys {list(keys)}, this row has {sorted(row)}")
        if k != "label" and not isinstance(row[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(row[k]).__name__}")
    return [row[k] for k in keys]


def labels_in(source) -> tuple[str, ...]:
    """The class names a classification data set uses, for a new classifier head: its string
    labels sorted, or LABEL_0 .. LABEL_n for integer labels 0 .. n (as transformers names them).
    Mixing the two, or a row without a label, is an error naming the row."""
    rows, where = read_rows(source)
    names, ints = set(), set()
    for row, w in zip(rows, where):
        label = row.get("label")
        if isinstance(label, str) and label:
            names.add(label)
        elif isinstance(label, int) and not isinstance(label, bool) and label >= 0:
            ints.add(label)
        else:
            raise ValueError(f"{w}: a classification row needs a \"label\" (a class name or an index >= 0), "
                             f"got {label!r}")
    if names and ints:
        raise ValueError("the data mixes class names and class indices as labels; use one kind")
    labels = tuple(sorted(names)) if names else tuple(f"LABEL_{i}" for i in range(max(ints) + 1))
    if len(labels) < 2:
        raise ValueError(f"the data has {len(labels)} class ({', '.join(labels)}); a classifier needs at least 2")
    return labels


def _label_index(label, labels: Sequence[str], where: str) -> int:
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        return label
    raise ValueError(f"{where}: label {label!r} is not one of the model's labels {list(labels)} "
                     f"(or an index below {len(labels)})")


def encode(rows, where, tokenizer, task: str, labels: Sequence[str] = ()) -> list[tuple[list[int], list[int], int]]:
    """rows -> [(ids, weights, label)]: weights[t] = 1 when token t is a loss target (SFT: the
    completion; mlm: a token that may be masked)."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; fine-tuning on text needs a folder with tokenizer files")
    eos = getattr(tokenizer, "eos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    out = []
    for row, w in zip(rows, where):
        label = -1
        if task == "sft" and "prompt" in row:
            prompt, completion = _need(row, ("prompt", "completion"), w, task)
            p = list(tokenizer.encode(prompt))
            c = list(tokenizer.encode(completion, add_special_tokens=False)) + ([eos] if eos is not None else [])
            ids, weights = p + c, [0] * len(p) + [1] * len(c)
        elif task == "classify":
            if row.get("text_pair") is not None:
                raise ValueError(f"{w}: classify fine-tuning takes one text per row; sentence pairs "
                                 "(\"text_pair\") are not supported for training yet")
            text, raw = _need(row, ("text", "label"), w, task)
            ids = list(tokenizer.encode(text))
            weights, label = [1] * len(ids), _label_index(raw, labels, w)
        else:
            (text,) = _need(row, ("text",), w, task)
            ids = list(tokenizer.encode(text)) + ([eos] if task == "sft" and eos is not None else [])
            if task == "sft":
                weights = [0] + [1] * (len(ids) - 1)
            else:  # mlm: special tokens ([CLS], [SEP]) are never masked
                weights = [int(i not in special) for i in ids]
        if not ids:
            raise ValueError(f"{w}: the row tokenizes to no tokens")
        out.append((ids, weights, label))
    return out


@dataclass
class Dataset:
    """Fixed-shape rows: tokens / positions / segments (0 = padding) / weights int32 [N, L],
    labels int32 [N]. `batch(position)` is deterministic in (seed, position)."""

    arrays: dict[str, np.ndarray]
    batch_size: int
    seed: int = 0
    stats: DataStats = field(default_factory=DataStats)

    def __post_init__(self):
        n = len(self)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if n == 0:
            raise ValueError("the dataset is empty")

    def __len__(self) -> int:
        return len(self.arrays["tokens"])

    def indices(self, position: int) -> np.ndarray:
        """Row indices of batch `position` (stream of seeded per-epoch permutations)."""
        n, b = len(self), self.batch_size
        flat = np.arange(position * b, (position + 1) * b)
        epochs = flat // n
        perms = {e: np.random.default_rng([self.seed, int(e)]).permutation(n) for e in np.unique(epochs)}
        return np.array([perms[e][i] for e, i in zip(epochs, flat % n)])

    def batch(self, position: int) -> dict[str, np.ndarray]:
        idx = self.indices(position)
        return {k: v[idx] for k, v in self.arrays.items()}

    def sequential(self):
        """Every row once, in order, in batches (the last one padded with empty rows): eval."""
        b = self.batch_size
        for start in range(0, len(self), b):
            idx = np.arange(start, start + b)
            out = {k: v[np.minimum(idx, len(self) - 1)] for k, v in self.arrays.items()}
            real = idx < len(self)
            out["weights"] = out["weights"] * real[:, None]
            out["labels"] = np.where(real, out["labels"], -1)
            yield out


def build(examples, *, max_length: int, batch_size: int, seed: int = 0, pack: bool = False,
          truncate: bool = False, where: Sequence[str] | None = None) -> Dataset:
    """[(ids, weights, label)] -> Dataset. Rows longer than `max_length` are an error naming the
    row unless `truncate` (then cut and counted in `stats.truncated`). `pack` concatenates
    examples into rows of `max_length` (segments keep them apart); otherwise one example per
    row, padded to the longest."""
    stats = DataStats(rows=len(examples))
    kept = []
    for i, (ids, weights, label) in enumerate(examples):
        if len(ids) > max_length:
            if not truncate:
                name = where[i] if where else f"row {i + 1}"
                raise ValueError(f"{name} has {len(ids)} tokens, more than the max length {max_length}; "
                                 "pass truncate=True (--truncate) to cut such rows, or raise the max length")
            ids, weights = ids[:max_length], weights[:max_length]
            stats.truncated += 1
        kept.append((ids, weights, label))
    rows: list[list[tuple]] = []
    if pack:
        used = max_length
        for ex in kept:
            if used + len(ex[0]) > max_length:
                rows.append([])
                used = 0
            rows[-1].append(ex)
            used += len(ex[0])
        L = max_length
    else:
        rows = [[ex] for ex in kept]
        L = max(len(ex[0]) for ex in kept)
    N = len(rows)
    arrays = {k: np.zeros((N, L), np.int32) for k in ("tokens", "positions", "segments", "weights")}
    arrays["labels"] = np.full((N,), -1, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, weights, label) in enumerate(row, 1):
            span = slice(at, at + len(ids))
            arrays["tokens"][r, span] = ids
            arrays["weights"][r, span] = weights
            arrays["segments"][r, span] = s
            arrays["positions"][r, span] = np.arange(len(ids))
            arrays["labels"][r] = label
            at += len(ids)
    stats.tokens = int((arrays["segments"] > 0).sum())
    stats.slots = N * L
    return Dataset(arrays, batch_size, seed, stats)


def load(source, tokenizer, task: str, *, max_length: int, batch_size: int, seed: int = 0,
         pack: bool | None = None, truncate: bool = False, labels: Sequence[str] = ()) -> Dataset:
    """source (file path or rows) -> Dataset for `task` ("sft" | "classify" | "mlm").
    Packing defaults on for SFT (segments keep examples apart) and off otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if pack and task == "classify":
        raise ValueError("packing applies to sft and mlm; classification has one text per row")
    rows, where = read_rows(source)
    examples = encode(rows, where, tokenizer, task, labels)
    return build(examples, max_length=max_length, batch_size=batch_size, seed=seed,
                 pack=task == "sft" if pack is None else pack, truncate=truncate, where=where)


def describe(ds: Dataset) -> dict[str, Any]:
    s = ds.stats
    return {"rows": s.rows, "sequences": len(ds), "length": ds.arrays["tokens"].shape[1], "tokens": s.tokens,
            "truncated": s.truncated, "fill": round(s.fill, 3)}
