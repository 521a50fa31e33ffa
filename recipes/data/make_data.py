"""Writes every data file of the recipes (see README.md here): `python -m recipes.data.make_data`.

Deterministic: the files are a pure function of SEED and the hand-written parts in
make_sentiment.py and make_catalog.py, so rerunning rewrites them byte for byte.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from . import make_catalog, make_sentiment

SEED = 26
HERE = Path(__file__).resolve().parent
CORPUS_HELD_OUT_ITEMS = 52  # catalog descriptions kept out of the masked-LM training corpus

# words the fill-mask check may hide: common words that are one token in BERT's uncased vocabulary
MASKABLE = {
    "rose", "fell", "profit", "shares", "sales", "board", "annual", "meeting", "dividend", "demand", "company",
    "market", "jobs", "plant", "orders", "contract", "results", "report", "loss", "record", "higher", "weak",
    "strong", "growing", "unchanged", "guidance", "debt", "chair", "analysts", "investors", "customers",
    "production", "prices", "year", "quarter", "head", "office", "coffee", "camera", "lens", "bread", "garden",
    "tent", "fish", "water", "light", "music", "rain", "yoga", "games", "family", "players", "wood", "steel",
    "glass", "cards", "morning", "summer", "winter", "city", "night", "home", "weekend", "cup", "seeds",
    "stars", "lakes", "trails", "bass", "vinyl", "rides", "dark", "spring", "sound", "kitchen",
}


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _masked(rows: list[tuple[str, str]], rnd: random.Random) -> list[dict]:
    """One [MASK] per held-out sentence that has a MASKABLE word: {"id", "text", "answer", "source"}."""
    out = []
    for source, text in rows:
        spots = [m for m in re.finditer(r"[A-Za-z]+", text) if m.group().lower() in MASKABLE]
        if not spots:
            continue
        m = rnd.choice(spots)
        out.append({"id": f"mask-{len(out):04d}", "text": text[:m.start()] + "[MASK]" + text[m.end():],
                    "answer": m.group().lower(), "source": source})
    return out


def main(out: Path = HERE) -> None:
    """Write every file under `out` (default: this folder, where the committed copies live)."""
    splits = make_sentiment.sentences(SEED)
    for name, rows in splits.items():
        _jsonl(out / "sentiment" / f"{name}.jsonl", rows)

    items = make_catalog.catalog(SEED)
    _jsonl(out / "recommend" / "catalog.jsonl", items)
    _jsonl(out / "recommend" / "users.jsonl", make_catalog.users(items, SEED))

    # masked-LM corpus: the sentiment training sentences and most catalog descriptions; the
    # sentiment test sentences and the other descriptions are held out for the fill-mask check
    train_items, held_items = items[:-CORPUS_HELD_OUT_ITEMS], items[-CORPUS_HELD_OUT_ITEMS:]
    corpus = [r["text"] for r in splits["train"]] + [it["description"] for it in train_items]
    held = [(r["id"], r["text"]) for r in splits["test"]] + [(it["id"], it["description"]) for it in held_items]
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "corpus" / "train.txt").write_text("".join(t + "\n" for t in corpus), encoding="utf-8")
    (out / "corpus" / "heldout.txt").write_text("".join(t + "\n" for _, t in held), encoding="utf-8")
    _jsonl(out / "corpus" / "masked_heldout.jsonl", _masked(held, random.Random(SEED)))


if __name__ == "__main__":
    main()
