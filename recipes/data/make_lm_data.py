"""Writes the language-model recipes' data (sft/, qa/, summarize/; see README.md here):
`python -m recipes.data.make_lm_data`.

Deterministic: the files are a pure function of SEED and the hand-written parts in make_sft.py,
make_qa.py and make_summarize.py, so rerunning rewrites them byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from . import make_qa, make_sft, make_summarize
from .make_data import _jsonl

SEED = 26
HERE = Path(__file__).resolve().parent


def main(out: Path = HERE) -> None:
    """Write every file under `out` (default: this folder, where the committed copies live)."""
    for folder, splits in (("sft", make_sft.examples(SEED)), ("qa", make_qa.items(SEED)),
                           ("summarize", make_summarize.items(SEED))):
        for name, rows in splits.items():
            _jsonl(out / folder / f"{name}.jsonl", rows)


if __name__ == "__main__":
    main()
