"""The host side of streaming: how many tokens each program call decodes (`StreamChunks`) and
incremental detokenisation with stop strings (`TextStreamer`).

The first call is one token (time to first token); later ones are sized to last about
STREAM_INTERVAL_S, so a fast device (where a program call costs more than a token) is not held
back by one host round trip per token, while a slow one still streams every token.
"""

from __future__ import annotations

import time

import numpy as np

STREAM_INTERVAL_S = 0.05  # streaming: each program call after the first decodes for about this long
MAX_STREAM_CHUNK = 64  # ... but at most this many tokens


class StreamChunks:
    """Tokens for each streaming program call. The first call prefills and decodes 1 token; the
    next two decode 1 and 2, so that a call's fixed cost and a token's cost can be told apart (a
    line through the last two calls of different sizes; a device slower than two intervals a
    token is not measured: it streams every token). Later calls take as many tokens as last
    STREAM_INTERVAL_S, or, where the fixed cost alone comes near that (a remote device), enough to
    make it at most a fifth of the call: 1..MAX_STREAM_CHUNK."""

    def __init__(self):
        self.calls = 0  # decode calls seen (after the first, prefill's)
        self.last: tuple[int, float] | None = None  # the last call's (tokens, seconds)
        self.per_call, self.per_token = 0.0, None

    def next(self, tokens: int, seconds: float) -> int:
        self.calls += 1
        if self.calls == 1:  # the prefill's call says nothing about a decode call
            return 1
        previous, self.last = self.last, (tokens, seconds)
        if previous is None:  # measure with 2 unless a token alone nearly fills two intervals
            return 2 if seconds < 2 * STREAM_INTERVAL_S else 1
        (k1, s1), (k2, s2) = previous, self.last
        if k1 != k2 and (s2 - s1) / (k2 - k1) > 0:
            self.per_token = (s2 - s1) / (k2 - k1)
            self.per_call = max(s2 - k2 * self.per_token, 0.0)
        elif self.per_token is None:  # noise: the larger call was not slower
            self.per_token, self.per_call = s2 / k2, 0.0
        t = max(self.per_token, 1e-9)
        k = max((STREAM_INTERVAL_S - self.per_call) / t, 4 * self.per_call / t)
        return int(min(MAX_STREAM_CHUNK, max(1, k + 1e-6)))  # 1e-6: 21.999... tokens is 22


class TextStreamer:
    """Host side of the decode loop: incremental detokenisation, stop strings, timing. Text that
    could be the start of a stop string is held back until the next tokens tell; `flush` sends
    what is held when generation ends."""

    def __init__(self, model, n, stop, stream, eos):
        self.tok, self.n, self.stop, self.stream, self.eos = model.tokenizer, n, stop, stream, set(eos)
        self.ids = [[] for _ in range(n)]
        self.sent = [""] * n  # streamed so far
        self.texts = [""] * n  # the text so far (cut at a stop string)
        self.finished = [False] * n
        self.first_token_at = None

    def text(self, i) -> str:
        return self.tok.decode(self.ids[i], skip_special_tokens=True)

    def _stop_at(self, text: str) -> int:
        """Where the first stop string starts in `text`, -1 if none does."""
        return min((text.find(s) for s in self.stop if s in text), default=-1)

    def __call__(self, tokens, first_step):
        """tokens [B, k]: the k newest tokens of every row -> bool [B] rows that hit a stop string."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        hit = np.zeros(len(tokens), bool)
        for i in range(self.n):
            if self.finished[i]:
                continue
            new = []
            for t in map(int, tokens[i]):  # an array [B, k], or one list per row (speculative decoding)
                if t in self.eos:
                    self.finished[i] = True
                    break
                new.append(t)
            self.ids[i] += new
            text = self.text(i)
            cut = self._stop_at(text)
            if cut >= 0:
                # a chunk can run past the stop string: keep the tokens up to the one completing it
                while len(new) > 1 and self._stop_at(self.tok.decode(self.ids[i][:-1], skip_special_tokens=True)) >= 0:
                    self.ids[i].pop()
                    new.pop()
                text, hit[i], self.finished[i] = text[:cut], True, True
            elif text.endswith("\ufffd") and not self.finished[i]:
                continue  # an incomplete multi-byte character: wait for the next token
            self.texts[i] = text
            held = 0 if self.finished[i] else max(
                (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            self._send(i, text[: len(text) - held])
        return hit

    def _send(self, i, text):
        if self.stream is not None and len(text) > len(self.sent[i]):
            self.stream(i, text[len(self.sent[i]):])
        self.sent[i] = text

    def flush(self) -> list[str]:
        """Send what was held back for a stop string that never came; -> every row's text."""
        for i in range(self.n):
            self._send(i, self.texts[i])
        return list(self.sent)
