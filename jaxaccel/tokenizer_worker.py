"""A `tokenizers` Tokenizer in a process of its own, for `FastTokenizer(folder, process=True)`.

Parsing a large tokenizer.json (Gemma 3: 262k tokens, 515k merges) takes ~1 s and holds the
GIL the whole time, which would stall the tracing and compiling that a fast `jaxaccel generate`
start does meanwhile. In its own process it parses on the other core instead.

Run as a script (`python tokenizer_worker.py tokenizer.json`), not imported: it must not import
jaxaccel (and so jax). Protocol: one JSON request per line on stdin, one JSON reply per line on
stdout; the first reply says the tokenizer is ready (or why it is not). EOF on stdin ends it.
"""

import json
import sys


def serve(tok, line: str) -> dict:
    req = json.loads(line)
    op = req["op"]
    if op == "encode":
        return {"ids": tok.encode(req["text"], add_special_tokens=req["special"]).ids}
    if op == "decode":
        return {"text": tok.decode(req["ids"], skip_special_tokens=req["skip"])}
    if op == "token_to_id":
        return {"id": tok.token_to_id(req["token"])}
    if op == "vocab_size":
        return {"n": tok.get_vocab_size()}
    raise ValueError(f"unknown op {op!r}")


def main(path: str) -> None:
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        print(json.dumps({"error": f"cannot load {path}: {type(e).__name__}: {e}"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            reply = serve(tok, line)
        except Exception as e:  # noqa: BLE001 - one bad request does not end the worker
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
