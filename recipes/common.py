"""What every recipe shares: its command line (`--quick`, `--out`, `--overwrite`), its output
folder, JSONL files, the jaxaccel CLI called in this process, and the stand-in model of --quick.

Recipes use jaxaccel's public API only: `jaxaccel.load` / `init_random` / `finetune`, the
`Model` methods, `QuantConfig`, and the `jaxaccel` command line (`jaxaccel.cli.main`, the
console script's entry point).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

DATA = Path(__file__).resolve().parent / "data"
RUNS = Path(__file__).resolve().parent / "runs"


class RecipeError(Exception):
    """Bad input to a recipe (its command line, an existing output folder): exit 2, no traceback."""


def parse_args(name: str, argv=None, doc: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m recipes.{name}", description=doc.strip().splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true",
                   help="seconds instead of minutes: a tiny random model (or a few steps) on a slice of the data; "
                        "checks that the recipe runs, its figures mean nothing")
    p.add_argument("--out", type=Path, default=RUNS / name, help=f"output folder (default recipes/runs/{name})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p.parse_args(argv)


def prepare_out(out: Path, overwrite: bool) -> Path:
    """An empty output folder: an existing non-empty one is replaced only with --overwrite (a
    recipe starts from scratch; resuming a half-run fine-tune with another config would fail)."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RecipeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def jaxaccel_cli(*args) -> None:
    """Run a `jaxaccel ...` command in this process (its compiled programs stay warm); raise if it fails."""
    from jaxaccel.cli import main

    argv = [str(a) for a in args]
    rc = main(argv)
    if rc:
        raise RuntimeError(f"`jaxaccel {' '.join(argv)}` exited with status {rc}")


def tiny_encoder(head: str = "encoder", seed: int = 0):
    """--quick's stand-in for MiniLM: a one-layer random BERT with MiniLM's tokenizer (same ids,
    so every step of a recipe runs unchanged, in seconds)."""
    import jaxaccel

    minilm = jaxaccel.load("minilm")
    cfg = minilm.config.replace(head=head, hidden_size=32, intermediate_size=64, num_layers=1,
                                                 num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    model = jaxaccel.init_random(cfg, seed)
    model.tokenizer = minilm.tokenizer
    return model


def save_results(out: Path, results: dict) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def run(main: Callable[[argparse.Namespace], dict], name: str, doc: str, argv=None) -> int:
    """A recipe's command line: parse, run `main(args)`, print its results; bad input -> exit 2."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        args = parse_args(name, argv, doc)
        results = main(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0
