"""What every recipe shares: its command line (`--quick`, `--out`, `--overwrite`), its output
folder, JSONL files, the jaxaccel CLI called in this process (and `jaxaccel serve` as a process),
and the stand-in models of --quick.

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


def tiny_decoder(seed: int = 0):
    """--quick's stand-in for Gemma 3 270M: a two-layer random Gemma 3 (one sliding, one full
    layer) with Gemma's tokenizer (same ids and special tokens, so the chat format is the same)."""
    import jaxaccel

    gemma = jaxaccel.load("gemma3-270m")
    cfg = gemma.config.replace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=16, query_pre_attn_scalar=16, layer_types=("sliding", "full"),
                               sliding_window=64, max_position_embeddings=1024)
    model = jaxaccel.init_random(cfg, seed)
    model.tokenizer = gemma.tokenizer
    return model


def decoder(name: str):
    """The decoder a recipe starts from: `jaxaccel.load(name)`, or "tiny" for --quick."""
    import jaxaccel

    return tiny_decoder() if name == "tiny" else jaxaccel.load(name)


def serve_chat(folder: Path, conversations: list[list[dict]], max_tokens: int, timeout: float = 600.0) -> list[str]:
    """Start `jaxaccel serve --model FOLDER` as its own process (the folder's chat template),
    send each conversation to /v1/chat/completions greedily, stop the server; the replies."""
    import socket
    import subprocess
    import tempfile
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads would block the server
    proc = subprocess.Popen([sys.executable, "-m", "jaxaccel.cli", "serve", "--model", str(folder), "--port", str(port),
                             "--embed-model", "none", "--max-batch", "2"],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"jaxaccel serve exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"jaxaccel serve did not answer /health within {timeout:.0f} s")
            time.sleep(0.5)
        replies = []
        for messages in conversations:
            r = httpx.post(url + "/v1/chat/completions", timeout=timeout,
                           json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            replies.append(r.json()["choices"][0]["message"]["content"])
        return replies
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
