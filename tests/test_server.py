"""`jaxaccel serve` as a real process on 127.0.0.1: the OpenAI client's calls, continuous batching
(greedy = jaxaccel.generate, seeded = its solo run, under load), bad input answered with 4xx while
the server keeps serving, disconnects, 429 / 401, SIGTERM draining; and the scheduler in-process."""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import jaxaccel
from jaxaccel.generation import _eos_ids

from conftest import random_hf_model, tiny_hf_config
from serve_util import ServerProcess, write_char_tokenizer

openai = pytest.importorskip("openai")

PROMPTS = ["hello world", "The quick brown fox", "a", "Once upon a time, in a land far away", "12345",
           "What is the answer?", "zzz", "JAX and XLA"]


def _folder(tmp_path_factory, name: str, chat_template: bool, positions: int | None = None):
    path = tmp_path_factory.mktemp(name)
    cfg = tiny_hf_config("gemma3")
    cfg.max_position_embeddings = positions or cfg.max_position_embeddings
    random_hf_model(cfg).save_pretrained(path)
    write_char_tokenizer(path, chat_template)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _folder(tmp_path_factory, "tinyserve", chat_template=True)


@pytest.fixture(scope="module")
def server(tiny):
    s = ServerProcess("--model", str(tiny), "--embed-model", "minilm", "--max-batch", "4", "--context", "128",
                      "--max-queue", "300")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def model(tiny):
    return jaxaccel.load(tiny)


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def metric(server, name: str, labels: str = "", headers=None) -> float:
    text = httpx.get(server.url + "/metrics", headers=headers).text
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_openai_client_completions_chat_streams_and_usage(server, model, tiny):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [tiny.name, "minilm"]
    r = c.completions.create(model=tiny.name, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=3)
    want = jaxaccel.generate(model, [PROMPTS[0]], max_new_tokens=12)[0]
    assert r.choices[0].text == want and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(model.tokenizer(PROMPTS[0])["input_ids"]) and r.usage.completion_tokens >= 1
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == want and len(lp.top_logprobs[0]) == 3
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()), abs=1e-5)  # greedy: the top one
    # chat: the folder's template, streamed, usage in the last chunk
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = model.tokenizer("<bos><system>be brief\n<user>hi\n<assistant>", add_special_tokens=False)["input_ids"]
    assert ids[0] == model.tokenizer.bos_token_id and ids.count(ids[0]) == 1
    want = jaxaccel.generate(model, [ids], max_new_tokens=10)[0]
    stream = c.chat.completions.create(model=tiny.name, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    assert any(ch.choices and ch.choices[0].logprobs for ch in chunks)
    full = c.chat.completions.create(model=tiny.name, messages=msgs, max_tokens=10, temperature=0, n=2)
    assert [ch.message.content for ch in full.choices] == [want, want] and full.usage.total_tokens > 0


def test_embeddings_equal_the_encoder(server):
    """/v1/embeddings serves the embedded MiniLM: the same vectors as jaxaccel's embed()."""
    texts = ["The cat sat on the mat.", "A quarterly revenue report", "x"]
    r = client(server).embeddings.create(model="minilm", input=texts)
    got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
    want = jaxaccel.load("minilm").embed(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)  # the client asked for base64 (its default)
    assert r.usage.prompt_tokens > len(texts)
    plain = httpx.post(server.url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}).json()
    np.testing.assert_allclose(plain["data"][0]["embedding"], want[0], atol=1e-6)


def test_stop_strings_and_seeded_sampling_equal_generate(server, model):
    c = client(server)
    ref = jaxaccel.generate(model, [PROMPTS[3]], max_new_tokens=30)[0]
    stop = ref[5:7]
    r = c.completions.create(model=server_name(server), prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == jaxaccel.generate(model, [PROMPTS[3]], max_new_tokens=30, stop=[stop])[0]
    assert r.choices[0].finish_reason == "stop"
    for kw in ({"temperature": 0.9, "seed": 7}, {"temperature": 1.3, "top_p": 0.8, "seed": 3},
               {"temperature": 0.7, "extra_body": {"top_k": 5}, "seed": 11}):
        r = c.completions.create(model=server_name(server), prompt=PROMPTS[1], max_tokens=16, **kw)
        extra = kw.pop("extra_body", {})
        want = jaxaccel.generate(model, [PROMPTS[1]], max_new_tokens=16, **kw, **extra)[0]
        assert r.choices[0].text == want, kw


def test_unseeded_sampling_differs_between_requests(server):
    """Without a seed each request draws afresh (with one, the same text: the tests above)."""
    texts = {client(server).completions.create(model=server_name(server), prompt="hello", max_tokens=24,
                                               temperature=1.0).choices[0].text for _ in range(4)}
    assert len(texts) > 1


def server_name(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def _request(server, prompt, settings, stream=False):
    """One completion over HTTP -> its text (SSE pieces joined when streaming)."""
    body = {"model": server_name(server), "prompt": prompt, "max_tokens": 20, **settings, "stream": stream}
    if not stream:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_sixteen_concurrent_streams_equal_solo_runs_and_compile_nothing(server, model):
    """16 streams, each its own prompt and settings, 4 slots: greedy ones equal jaxaccel.generate,
    seeded ones their solo run; the program count does not grow with new sampling values."""
    settings = [{"temperature": 0}, {"temperature": 0.8, "seed": 1}, {"temperature": 1.1, "top_p": 0.9, "seed": 2},
                {"temperature": 0.6, "top_k": 7, "seed": 3}]
    jobs = [(PROMPTS[i % len(PROMPTS)] + str(i), settings[i % 4] | ({"seed": 100 + i} if i % 4 else {}))
            for i in range(16)]
    _request(server, "warm", {"temperature": 0})
    programs = metric(server, "jaxaccel_compiled_programs")
    solo = [_request(server, p, s) for p, s in jobs]
    with ThreadPoolExecutor(16) as pool:
        busy = list(pool.map(lambda j: _request(server, *j, stream=True), jobs))
    assert busy == solo
    for (p, s), text in zip(jobs, solo):
        if s["temperature"] == 0:
            assert text == jaxaccel.generate(model, [p], max_new_tokens=20)[0]
    assert metric(server, "jaxaccel_compiled_programs") == programs


REPEATS = "one two three, one two three, one two three, one two"  # its own spans: prompt lookup drafts them


def _completion(server, prompt: str, **settings) -> dict:
    body = {"model": server_name(server), "prompt": prompt, "max_tokens": 40, **settings}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_speculative_greedy_requests_equal_plain_ones_and_generate(server, model):
    """"speculative": "prompt_lookup" per request: the same text, logprobs and stop as the plain
    request and jaxaccel.generate, for a prompt that repeats its own spans and one that does not;
    the drafts are counted in the usage and in /metrics."""
    accepted_before = metric(server, "jaxaccel_speculative_accepted_tokens_total")
    for prompt in (REPEATS, PROMPTS[3]):
        want = jaxaccel.generate(model, [prompt], max_new_tokens=40)[0]
        plain = _completion(server, prompt, temperature=0, logprobs=2)
        spec = _completion(server, prompt, temperature=0, logprobs=2, speculative="prompt_lookup")
        assert spec["choices"][0]["text"] == plain["choices"][0]["text"] == want
        lp, plain_lp = spec["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
        assert lp["tokens"] == plain_lp["tokens"]
        np.testing.assert_allclose(lp["token_logprobs"], plain_lp["token_logprobs"], atol=1e-4)
        assert [sorted(t) for t in lp["top_logprobs"]] == [sorted(t) for t in plain_lp["top_logprobs"]]
        assert "speculative" not in plain["usage"] and spec["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        drafts = spec["usage"]["speculative"]
        assert 0 <= drafts["accepted_tokens"] <= drafts["drafted_tokens"]
        if prompt == REPEATS:
            assert drafts["accepted_tokens"] > 0, drafts
    assert metric(server, "jaxaccel_speculative_accepted_tokens_total") > accepted_before
    assert metric(server, "jaxaccel_speculative_drafted_tokens_total") >= metric(
        server, "jaxaccel_speculative_accepted_tokens_total")
    # a stop string, and a stream; "none" turns it off
    ref = jaxaccel.generate(model, [REPEATS], max_new_tokens=40)[0]
    stop = ref[9:11]
    r = _completion(server, REPEATS, temperature=0, stop=[stop], speculative="prompt_lookup")
    assert r["choices"][0]["text"] == jaxaccel.generate(model, [REPEATS], max_new_tokens=40, stop=[stop])[0]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert _request(server, REPEATS, {"temperature": 0, "max_tokens": 40, "speculative": "prompt_lookup"},
                    stream=True) == ref
    assert "speculative" not in _completion(server, REPEATS, temperature=0, speculative="none")["usage"]


def test_concurrent_speculative_plain_and_sampled_rows_equal_their_solo_runs(server, model):
    """Speculating, plain, greedy and seeded sampled requests at once (more than the slots): each
    gives the text of its solo run; greedy ones jaxaccel.generate's."""
    spec = {"speculative": "prompt_lookup", "max_tokens": 30}
    jobs = [(REPEATS, {"temperature": 0, **spec}),
            (PROMPTS[1], {"temperature": 0.8, "seed": 5, **spec}),
            (PROMPTS[3], {"temperature": 0, "max_tokens": 30}),
            (PROMPTS[0], {"temperature": 0.9, "seed": 2, "max_tokens": 30}),
            (REPEATS + "!", {"temperature": 0.7, "top_k": 5, "seed": 9, **spec}),
            (PROMPTS[5], {"temperature": 0, **spec})]
    solo = [_request(server, p, s) for p, s in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        busy = list(pool.map(lambda j: _request(server, *j, stream=True), jobs))
    assert busy == solo
    for (p, s), text in zip(jobs, solo):
        if s["temperature"] == 0:
            assert text == jaxaccel.generate(model, [p], max_new_tokens=30)[0]


@pytest.mark.slow
def test_seeded_sampled_speculative_requests_equal_generate(server, model):
    """A seeded sampled speculative request follows the same drafting schedule and draws as
    jaxaccel.generate(..., speculative="prompt_lookup") with that seed: the same text (sampled
    acceptance exercised: some drafts are accepted)."""
    accepted = 0
    for prompt, settings in ((REPEATS, {"temperature": 0.1, "seed": 3}),
                             (PROMPTS[3], {"temperature": 0.8, "top_p": 0.9, "seed": 8})):
        r = _completion(server, prompt, speculative="prompt_lookup", **settings)
        want = jaxaccel.generate(model, [prompt], max_new_tokens=40, speculative="prompt_lookup", **settings)[0]
        assert r["choices"][0]["text"] == want, settings
        accepted += r["usage"]["speculative"]["accepted_tokens"]
    assert accepted > 0


def test_load_then_bad_input_then_a_good_request(server, model):
    """64 clients x 4 requests: none lost, truncated or mixed up; then every bad input gets a 4xx
    with an OpenAI error body and a good request still succeeds (a client that disconnects
    mid-stream: the next test, where generation runs long enough to hang up in the middle)."""
    prompts = [f"{PROMPTS[i % 8]} #{i}" for i in range(32)]
    want = {p: jaxaccel.generate(model, [p], max_new_tokens=8)[0] for p in prompts}

    def client_run(k):
        return [(p, _request(server, p, {"temperature": 0, "max_tokens": 8}, stream=(k + j) % 2 == 0))
                for j, p in enumerate(prompts[(k + j) % 32] for j in range(4))]

    t0 = time.time()
    with ThreadPoolExecutor(64) as pool:
        results = [r for rs in pool.map(client_run, range(64)) for r in rs]
    assert len(results) == 256 and all(text == want[p] for p, text in results), time.time() - t0

    V, url, name = model.config.vocab_size, server.url, server_name(server)
    ok = {"model": name, "prompt": "hi", "max_tokens": 4}
    bad = [("/v1/completions", b"{not json", 400, None),
           ("/v1/completions", {**ok, "temperature": "hot"}, 400, "temperature"),
           ("/v1/completions", {**ok, "max_tokens": "8"}, 400, "max_tokens"),
           ("/v1/completions", {**ok, "model": "gpt-9"}, 404, "model"),
           ("/v1/completions", {**ok, "max_tokens": 0}, 400, "max_tokens"),
           ("/v1/completions", {**ok, "max_tokens": 200}, 400, "max_tokens"),
           ("/v1/completions", {**ok, "prompt": "x" * 300}, 400, "prompt"),
           ("/v1/completions", {**ok, "prompt": [1, 2, V]}, 400, "prompt"),
           ("/v1/completions", {**ok, "n": 99}, 400, "n"),
           ("/v1/chat/completions", {"model": name, "messages": []}, 400, "messages"),
           ("/v1/chat/completions", {"model": name, "messages": [{"role": "wizard", "content": "x"}]}, 400,
            "messages[0].role"),
           ("/v1/completions", {**ok, "logit_bias": {"5": 10}}, 400, "logit_bias"),
           ("/v1/completions", {**ok, "speculative": "ngram"}, 400, "speculative"),
           ("/v1/completions", {**ok, "speculative": True}, 400, "speculative"),
           ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}],
                                     "tools": [{"type": "function"}]}, 400, "tools"),
           ("/v1/embeddings", {"model": name, "input": "x"}, 400, "model"),
           ("/v1/embeddings", {"model": "minilm", "input": [""]}, 400, "input")]
    for path, body, status, param in bad:
        r = httpx.post(url + path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
    r = httpx.post(url + "/v1/completions", json={**ok, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == jaxaccel.generate(model, ["hi"], max_new_tokens=4)[0]


def test_api_key_queue_limit_chat_without_template_and_sigterm_drain(tmp_path_factory):
    folder = _folder(tmp_path_factory, "plain", chat_template=False, positions=4096)
    s = ServerProcess("--model", str(folder), "--embed-model", "none", "--max-batch", "1", "--max-queue", "1",
                      "--context", "4096", "--api-key", "sesame")
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # open without the key
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sesame"}
        r = httpx.post(s.url + "/v1/chat/completions", headers=auth,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
        # one slot, one queue place: with one request running and one waiting, the next is refused with 429
        body = {"prompt": "hello", "max_tokens": 4000, "temperature": 0}
        assert len(jaxaccel.generate_tokens(jaxaccel.load(folder), ["hello"], max_new_tokens=4000)[0]) == 4000  # no EOS
        with ThreadPoolExecutor(2) as pool, httpx.stream("POST", s.url + "/v1/completions", headers=auth,
                                                         json={**body, "stream": True}, timeout=120) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # it holds the slot
            waiting = pool.submit(httpx.post, s.url + "/v1/completions", headers=auth, json={**body, "max_tokens": 4},
                                  timeout=120)
            while metric(s, "jaxaccel_queue_depth", headers=auth) < 1 and not waiting.done():
                time.sleep(0.02)
            third = httpx.post(s.url + "/v1/completions", headers=auth, json=body, timeout=120)
            assert metric(s, "jaxaccel_active_slots", headers=auth) == 1, "the first request ended too soon to test 429"
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
            assert waiting.result().status_code == 200
        # a client that hangs up mid-stream (4000 tokens to go, no EOS; speculating): its slot is freed, counted
        # as cancelled
        with httpx.stream("POST", s.url + "/v1/completions", headers=auth,
                          json={**body, "stream": True, "speculative": "prompt_lookup"}, timeout=120) as r:
            next(r.iter_lines())
        deadline = time.time() + 30
        while time.time() < deadline and metric(s, "jaxaccel_active_slots", headers=auth) > 0:
            time.sleep(0.1)
        assert metric(s, "jaxaccel_active_slots", headers=auth) == 0
        finished = [ln for ln in httpx.get(s.url + "/metrics", headers=auth).text.splitlines() if "requests_total{" in ln]
        assert 'jaxaccel_requests_total{finish="cancelled"} 1.0' in finished, finished
        # SIGTERM while a stream runs: it finishes, then the process exits 0
        text, finish = "", None
        with httpx.stream("POST", s.url + "/v1/completions", headers=auth, json={**body, "stream": True},
                          timeout=120) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 0:
                    s.proc.send_signal(signal.SIGTERM)
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text, finish = text + choice["text"], choice["finish_reason"] or finish
        assert finish == "length" and len(text) > 0
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


def test_scheduler_timeout_and_cancel_free_the_slot(model):
    """In-process: a request past its timeout ends with an error event, a cancelled one ends
    silently, and the slots serve the next request with the same text as before."""
    from jaxaccel.scheduler import Request, Scheduler

    sch = Scheduler(model, slots=1, context=128, max_queue=4, eos=_eos_ids(model))
    sch.start()
    ids = list(model.tokenizer("hello")["input_ids"])
    events = {k: [] for k in ("slow", "gone", "ok")}
    slow = Request(ids, 100, timeout=1e-9, on_event=events["slow"].append)
    gone = Request(ids, 100, on_event=events["gone"].append)
    gone.cancelled = True
    ok = Request(ids, 6, on_event=events["ok"].append)
    for r in (slow, gone, ok):
        sch.submit(r)
    sch.stop(60)
    assert events["slow"][-1].kind == "error" and "timeout" in events["slow"][-1].message
    assert events["gone"] == []
    assert "".join(e.text for e in events["ok"]) == jaxaccel.generate(model, ["hello"], max_new_tokens=6)[0]
    assert events["ok"][-1].finish_reason in ("length", "stop") and sch.active == 0


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gemma_served_greedy_equals_generate():
    """The embedded Gemma 3 270M behind the server: greedy text equals jaxaccel.generate, alone
    and beside other requests."""
    m = jaxaccel.load("gemma3-270m")
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The three primary colors are"]
    want = [jaxaccel.generate(m, [p], max_new_tokens=24)[0] for p in prompts]
    s = ServerProcess("--embed-model", "none", "--max-batch", "4", "--context", "256")
    try:
        body = lambda p: {"prompt": p, "max_tokens": 24, "temperature": 0}
        alone = [httpx.post(s.url + "/v1/completions", json=body(p), timeout=300).json()["choices"][0]["text"]
                 for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            busy = list(pool.map(lambda p: httpx.post(s.url + "/v1/completions", json=body(p), timeout=300)
                                 .json()["choices"][0]["text"], prompts))
        assert alone == want and busy == want
    finally:
        assert s.stop() == 0
    assert np.all([len(w) > 0 for w in want])


def test_bad_speculative_flag_is_a_clear_error(capsys):
    from jaxaccel import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--speculative", "ngram"])
    assert e.value.code == 2 and "--speculative: invalid choice: 'ngram'" in capsys.readouterr().err
    from jaxaccel.server import Server

    with pytest.raises(ValueError, match="--speculative must be one of prompt_lookup, none, got 'ngram'"):
        Server(encoder=object(), speculative="ngram")


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma_served_with_speculative_flag_equals_generate():
    """`serve --speculative prompt_lookup`: requests that do not say speculate (four at once over
    two slots), one that says "none" does not; greedy text equals jaxaccel.generate."""
    m = jaxaccel.load("gemma3-270m")
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The three primary colors are"]
    want = [jaxaccel.generate(m, [p], max_new_tokens=24)[0] for p in prompts]
    s = ServerProcess("--embed-model", "none", "--max-batch", "2", "--context", "256", "--speculative", "prompt_lookup")
    try:
        post = lambda p, **kw: httpx.post(s.url + "/v1/completions", timeout=600, json={
            "prompt": p, "max_tokens": 24, "temperature": 0, **kw}).json()
        with ThreadPoolExecutor(4) as pool:
            speculating = list(pool.map(post, prompts))
        plain = post(prompts[0], speculative="none")
        assert [r["choices"][0]["text"] for r in speculating] == want and plain["choices"][0]["text"] == want[0]
        assert all("speculative" in r["usage"] for r in speculating) and "speculative" not in plain["usage"]
        assert metric(s, "jaxaccel_speculative_drafted_tokens_total") > 0
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("flag,value,message", [("--max-batch", "0", "--max-batch must be an integer >= 1"),
                                                ("--context", "8", "--context must be an integer >= 16"),
                                                ("--timeout", "0", "--timeout must be a positive number")])
def test_bad_serve_flags_are_clear_errors(tiny, capsys, flag, value, message):
    from jaxaccel import cli

    assert cli.main(["serve", "--model", str(tiny), "--embed-model", "none", flag, value]) == 2
    assert message in capsys.readouterr().err
