"""A fast-start tokenizer: the `tokenizers` (Rust) object behind an HF-style interface.

`transformers.AutoTokenizer` spends ~6 s on Gemma 3's 262k-token `tokenizer.json` (importing
its auto classes, then parsing the JSON in Python); `tokenizers.Tokenizer.from_file` reads
the same file in ~1 s. The CLI uses this class for a quick start; `.hf` builds the full
transformers tokenizer on demand. Encoding and decoding are the same object's, so ids agree
with the transformers tokenizer built from the same file (tested).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_SPECIAL = ("bos", "eos", "pad", "unk")


class FastTokenizer:
    """Subset of the transformers tokenizer API used by jaxaccel (encode, decode, special ids)."""

    def __init__(self, folder, process: bool = False):
        """process=True: tokenizer.json is parsed, and
        every encode/decode runs, in a worker process (tokenizer_worker.py): the parse holds
        the GIL for a noticeable time on a large vocabulary (Gemma's), so the CLI has it done on the other core while
        it traces and compiles the generation program."""
        self.folder = Path(folder)
        if process:
            self._tok = _ProcessTokenizer(self.folder / "tokenizer.json")
        else:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        cfg_file = self.folder / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        for kind in _SPECIAL:
            token = cfg.get(f"{kind}_token")
            if isinstance(token, dict):  # AddedToken serialised as a dict
                token = token.get("content")
            setattr(self, f"{kind}_token", token)
        # transformers' class default differs per model (Gemma pads left); ours: the config's, else right
        self.padding_side = cfg.get("padding_side", "right")

    def _id(self, token):
        if token is None:
            return None
        ids = self.__dict__.setdefault("_ids", {})
        if token not in ids:
            ids[token] = self._tok.token_to_id(token)
        return ids[token]

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    vocab_size = property(lambda self: self._tok.get_vocab_size())

    @staticmethod
    def available(folder) -> bool:
        return (Path(folder) / "tokenizer.json").is_file()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, padding: bool = False, return_tensors=None):
        """str -> {"input_ids": [...]}; list[str] -> lists (padded on `padding_side` with `padding`)."""
        single = isinstance(text, str)
        ids = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        masks = [[1] * len(x) for x in ids]
        if padding:
            width = max(map(len, ids))
            pad = self.pad_token_id or 0
            side = (lambda x, fill: x + fill) if self.padding_side == "right" else (lambda x, fill: fill + x)
            ids = [side(x, [pad] * (width - len(x))) for x in ids]
            masks = [side(m, [0] * (width - len(m))) for m in masks]
        if return_tensors == "np":
            return {"input_ids": np.asarray(ids), "attention_mask": np.asarray(masks)}
        if return_tensors is not None:
            raise ValueError(f"FastTokenizer supports return_tensors=None or 'np', not {return_tensors!r}")
        return {"input_ids": ids[0] if single else ids, "attention_mask": masks[0] if single else masks}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def save_pretrained(self, out_dir) -> None:
        # chat_template.jinja: where transformers 5 keeps the chat template (`jaxaccel serve`'s chat)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (self.folder / name).is_file():
                shutil.copy(self.folder / name, Path(out_dir) / name)

    @cached_property
    def hf(self):
        """The full transformers tokenizer of the same folder (slow to build)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))


class _ProcessTokenizer:
    """The part of `tokenizers.Tokenizer` that FastTokenizer uses, answered by a worker process
    (started at once; the first request waits until it has parsed the file)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        worker = Path(__file__).with_name("tokenizer_worker.py")
        self._log = tempfile.TemporaryFile()  # its stderr: a pipe nobody reads could fill and stall it
        self._proc = subprocess.Popen([sys.executable, str(worker), str(self.path)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, encoding="utf-8")
        self._ready = False
        self._in_step = True  # request and reply alternate; False after an interrupted exchange
        weakref.finalize(self, _stop, self._proc, self._log)

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._log.seek(0)
            err = self._log.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"the tokenizer process for {self.path} ended unexpectedly: {err or 'no message'}")
        return json.loads(line)

    def _checked(self, reply: dict) -> dict:
        if "error" in reply:
            raise ValueError(f"tokenizer {self.path}: {reply['error']}")
        return reply

    def _ask(self, **request) -> dict:
        with self._lock:
            if not self._in_step:  # an earlier exchange was interrupted (Ctrl-C): its reply may be
                _stop(self._proc, self._log)  # pending, so start a fresh worker rather than misread it
                self._start()
            self._in_step = False
            if not self._ready:
                self._checked(self._read())  # "ready", or the load error
                self._ready = True
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the read below reports why the process is gone
            reply = self._read()
            self._in_step = True
            return self._checked(reply)

    def encode(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(ids=self._ask(op="encode", text=text, special=add_special_tokens)["ids"])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._ask(op="decode", ids=list(ids), skip=skip_special_tokens)["text"]

    def token_to_id(self, token: str):
        return self._ask(op="token_to_id", token=token)["id"]

    def get_vocab_size(self) -> int:
        return self._ask(op="vocab_size")["n"]


def _stop(proc, log) -> None:
    """End a worker: EOF on its stdin ends its loop."""
    try:
        proc.stdin.close()
        proc.wait(timeout=5)
    except Exception:  # noqa: BLE001 - at interpreter exit; kill as the last resort
        proc.kill()
    log.close()
