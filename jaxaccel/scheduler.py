"""The host side of continuous batching: a bounded queue of requests, the slot each one runs in,
incremental text with stop strings, cancellation and timeouts, all on one thread that owns the
device programs (slots.py).

Between two decode calls the loop ends requests that finished, were cancelled (a client that
disconnected) or ran past their deadline, frees their slots at once, and prefills waiting
requests into free slots; the decode call then advances every live slot. Each request gets its
events through its own callback (the server turns them into an HTTP response or SSE stream).

Speculative requests (`Request.speculative`): before each call every such request whose plain
budget is spent asks its drafter (prompt lookup over its prompt + generated tokens) for up to k
tokens, k from its own `AdaptiveK`. When any live request has drafts, the call is a verify call
(`SlotEngine.verify`: drafting rows get 1 .. k + 1 tokens, the others one plain step); otherwise a
decode call. A request that found nothing to draft takes NO_DRAFT_STEPS plain tokens before it
looks again (AdaptiveK.REST when its k rests at 0), in whatever calls they come: when a request
drafts depends only on its own tokens, never on the other requests, so its text does not either.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .sampling import rows
from .slots import CHUNK, VERIFY_K, SlotEngine
from .speculative import NO_DRAFT_STEPS, AdaptiveK, PromptLookup
from .streaming import TextStreamer


class _NoText:
    """A model without a tokenizer serves token ids only: its streamer sees no text."""

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "")


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


@dataclass
class TokenInfo:
    """One generated token: its id and, when asked, the model's log-probability and alternatives."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Event:
    """kind: "text" (new `text` and the `tokens` behind it), "done" (`finish_reason`, usage
    counts) or "error" (`message`)."""

    kind: str
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""
    drafted: int = 0  # speculative requests: draft tokens proposed / accepted (kept in the text)
    accepted: int = 0


SPECULATIVE = ("prompt_lookup",)  # the drafters a served request may name


@dataclass
class Drafting:
    """A speculative request's drafting state (host side): its k, the plain tokens it takes before
    it asks the drafter again, its counts."""

    adapt: AdaptiveK = field(default_factory=AdaptiveK)
    plain_left: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Request:
    ids: list[int]
    max_new: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0..TOP_LOGPROBS alternatives per token
    timeout: float | None = None  # seconds from submission
    speculative: str | None = None  # a drafter of SPECULATIVE, or None: plain decoding
    on_event: Callable[[Event], None] = lambda e: None
    cancelled: bool = False  # set from any thread: the slot is freed at the next step
    submitted: float = 0.0
    first_token_at: float | None = None
    # host-side state while it runs
    streamer: TextStreamer | None = None
    infos: list[TokenInfo] = field(default_factory=list)
    generated: int = 0
    last_token_at: float = 0.0
    history: list[int] = field(default_factory=list)  # prompt + generated tokens (what the drafter reads)
    drafting: Drafting | None = None


class Observer:
    """Hooks for metrics (the server's prometheus counters); the default does nothing."""

    def queue(self, depth: int, active: int) -> None: ...
    def started(self, prompt_tokens: int, ttft: float) -> None: ...
    def tokens(self, n: int, seconds_per_token: float) -> None: ...
    def finished(self, reason: str) -> None: ...
    def speculated(self, drafted: int, accepted: int) -> None: ...


class Scheduler:
    """Requests in, events out; `start()` runs the loop on its own thread, `stop()` drains it."""

    def __init__(self, model, slots: int, context: int, max_queue: int, eos, observer: Observer | None = None):
        self.model, self.eos, self.max_queue = model, list(eos), max_queue
        self.engine = SlotEngine(model, slots, context, eos)
        self.observer = observer or Observer()
        self.queue: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.release = np.zeros((slots,), bool)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._drafters = {"prompt_lookup": PromptLookup()}

    # -- from any thread --------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queue a request (checked already); raises QueueFull when max_queue wait already."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already (--max-queue {self.max_queue})")
            req.submitted = time.perf_counter()
            self.queue.append(req)
            self._cv.notify()
        self.observer.queue(len(self.queue), len(self.running))

    def cancel(self, req: Request) -> None:
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jaxaccel-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        return len(self.running)

    # -- the loop thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.queue or self.running or self._stopping):
                    self._cv.wait()
                if self._stopping and not self.queue and not self.running:
                    return
            try:
                self._end_cancelled()
                self._admit()
                if self.running:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a device failure ends every request, not the server
                for slot, req in list(self.running.items()):
                    self._finish(slot, req, error=f"generation failed: {type(e).__name__}: {e}")
            self.observer.queue(len(self.queue), len(self.running))

    def _free_slot(self) -> int | None:
        return next((s for s in range(self.engine.slots) if s not in self.running), None)

    def _admit(self) -> None:
        while True:
            with self._cv:
                slot = self._free_slot()
                if slot is None or not self.queue:
                    return
                req = self.queue.popleft()
            if req.cancelled or self._expired(req):
                self._emit_end(req, "cancelled" if req.cancelled else None)
                continue
            self._start(slot, req)

    def _start(self, slot: int, req: Request) -> None:
        req.streamer = TextStreamer(self.model if self.model.tokenizer is not None else _NoText, 1, req.stop, None, self.eos)
        rs = rows([(req.temperature, req.top_k, req.top_p)], self.model.config.vocab_size)
        req.history = list(req.ids)
        req.drafting = Drafting() if req.speculative is not None else None
        self.running[slot] = req
        self.release[slot] = False
        out = self.engine.prefill(slot, req.ids, req.seed, req.max_new, rs, req.top_logprobs is not None)
        now = time.perf_counter()
        req.first_token_at = req.last_token_at = now
        self.observer.started(len(req.ids), now - req.submitted)
        self._take(slot, req, out, 0, bool(self.engine.done()[slot]))

    def _decode(self) -> None:
        steps = 1 if self.queue and self._free_slot() is None else CHUNK
        live = sorted(self.running)
        drafts = {slot: d for slot in live if (d := self._draft(self.running[slot]))}
        if drafts:
            out, accepted = self.engine.verify(drafts, self.release, live)
        else:
            limit = np.full((self.engine.slots,), steps, np.int32)
            for slot in live:
                if self.running[slot].drafting is not None:
                    limit[slot] = min(steps, self.running[slot].drafting.plain_left)
            out = self.engine.decode(limit, self.release, live)
        self.release[:] = False
        done = self.engine.done()
        for slot, req in list(self.running.items()):
            if req.drafting is not None:
                self._count(req, drafts.get(slot, []), int(out.valid[slot].sum()), int(accepted[slot]) if drafts else 0)
            self._take(slot, req, out, slot, bool(done[slot]))

    def _count(self, req: Request, drafts: list[int], n: int, accepted: int) -> None:
        """After a call that gave a speculative request n tokens: its drafts kept (the accepted ones
        the text got: at most n, fewer after an EOS) update its k and counts; else n of its plain
        tokens are spent."""
        d = req.drafting
        if not drafts:
            d.plain_left = max(d.plain_left - n, 0)
            return
        kept = min(accepted, n)
        d.adapt.update(len(drafts), kept)
        d.drafted, d.accepted = d.drafted + len(drafts), d.accepted + kept
        self.observer.speculated(len(drafts), kept)

    def _draft(self, req: Request) -> list[int]:
        """A speculative request's drafts for this call (none while it takes plain tokens; when
        the drafter has nothing, it takes NO_DRAFT_STEPS plain tokens before it asks again)."""
        d = req.drafting
        if d is None or d.plain_left:
            return []
        # the call adds the model's own token after the drafts: room for max_tokens and the context
        room = min(req.max_new - req.generated, self.engine.context - len(req.history) + 1) - 1
        want = d.adapt.next()  # 0: it rests (its drafts were not accepted lately)
        k = min(want, VERIFY_K[-1], room)
        drafts = self._drafters[req.speculative].propose(req.history, k) if k > 0 else []
        if not drafts:
            d.plain_left = AdaptiveK.REST if want == 0 else NO_DRAFT_STEPS
        return drafts

    def _take(self, slot: int, req: Request, out, row: int, device_done: bool) -> None:
        """Hand a request its new tokens (row `row` of `out`) and end it when it is done."""
        valid = out.valid[row]
        new = out.tokens[row][valid].tolist()
        if not new and not device_done:
            return
        infos = []
        for j, t in zip(np.flatnonzero(valid), new):
            top = None
            if req.top_logprobs:
                top = list(zip(out.top_ids[row, j, : req.top_logprobs].tolist(), out.top_lp[row, j, : req.top_logprobs].tolist()))
            infos.append(TokenInfo(int(t), float(out.logprob[row, j]) if req.top_logprobs is not None else None, top))
        now = time.perf_counter()
        if new:
            self.observer.tokens(len(new), (now - req.last_token_at) / len(new))
        req.last_token_at = now
        before = req.streamer.sent[0]
        hit = bool(req.streamer(np.asarray([new]), req.generated)[0]) if new else False
        req.generated += len(new)
        req.history += new
        kept = len(req.streamer.ids[0]) + (1 if req.streamer.finished[0] and not hit else 0)  # the EOS counts
        fresh = infos[: max(kept - len(req.infos), 0)]
        req.infos += fresh
        text = req.streamer.sent[0][len(before):]
        if text or fresh:
            req.on_event(Event("text", text=text, tokens=fresh))
        if hit or device_done or req.streamer.finished[0]:
            self._finish(slot, req, reason="stop" if (hit or req.streamer.finished[0]) else "length")

    def _end_cancelled(self) -> None:
        for slot, req in list(self.running.items()):
            if req.cancelled:
                self._finish(slot, req, reason="cancelled")
            elif self._expired(req):
                self._finish(slot, req, error=f"the request ran past its timeout of {req.timeout:g}s")
        with self._cv:
            gone = [r for r in self.queue if r.cancelled or self._expired(r)]
            for r in gone:
                self.queue.remove(r)
        for r in gone:
            self._emit_end(r, "cancelled" if r.cancelled else None)

    def _expired(self, req: Request) -> bool:
        return req.timeout is not None and time.perf_counter() - req.submitted > req.timeout

    def _emit_end(self, req: Request, reason: str | None) -> None:
        if reason is None:
            req.on_event(Event("error", message=f"the request waited past its timeout of {req.timeout:g}s"))
        self.observer.finished(reason or "timeout")

    def _finish(self, slot: int, req: Request, reason: str | None = None, error: str | None = None) -> None:
        del self.running[slot]
        self.release[slot] = True
        if error is not None:
            req.on_event(Event("error", message=error))
            self.observer.finished("error" if "timeout" not in error else "timeout")
            return
        if reason != "cancelled":
            before = req.streamer.sent[0]
            tail = req.streamer.flush()[0][len(before):]  # text held back for a stop string that never came
            d = req.drafting
            req.on_event(Event("done", text=tail, finish_reason=reason, prompt_tokens=len(req.ids),
                               completion_tokens=len(req.infos), drafted=d.drafted if d else 0,
                               accepted=d.accepted if d else 0))
        self.observer.finished(reason)
