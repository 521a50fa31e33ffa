"""bench.profile_decode: the trace summary counts each line's events and time per decode step,
variants parse and reach XLA, and a small run reports every timing. No timing is asserted."""

import pytest

from bench import profile_decode


def test_summarise_counts_events_and_time_per_step():
    M = lambda name, pid, tid=None, what="process_name": {"ph": "M", "name": what, "pid": pid, "tid": tid,
                                                          "args": {"name": name}}
    X = lambda name, pid, tid, ts, dur: {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}
    trace = {"traceEvents": [
        M("/device:GPU:0", 1), M("Stream #14", 1, 7, "thread_name"), M("/host:CPU", 2), M("python", 2, 3, "thread_name"),
        X("gemm", 1, 7, 0, 4.0), X("reduce", 1, 7, 5, 1.0), X("gemm", 1, 7, 10, 4.0), X("reduce", 1, 7, 20, 1.0),
        X("run", 2, 3, 0, 30.0)]}
    s = profile_decode.summarise(trace, steps=2)
    python, gpu = s["lines"]  # busiest first
    assert (python["process"], python["thread"], python["busy_us"]) == ("/host:CPU", "python", 30.0)
    assert (gpu["process"], gpu["thread"]) == ("/device:GPU:0", "Stream #14")
    assert gpu["events"] == 4 and gpu["events_per_step"] == 2 and gpu["busy_us_per_step"] == 5.0
    assert gpu["span_us"] == 21.0
    assert [(t["name"], t["count"], t["us_per_step"]) for t in gpu["top"]] == [("gemm", 2, 4.0), ("reduce", 2, 1.0)]


def test_parse_variant():
    assert profile_decode.parse_variant("g:xla_a= xla_b=FUSION,WHILE xla_c=1 xla_d=false") == (
        "g", {"xla_a": "", "xla_b": "FUSION,WHILE", "xla_c": 1, "xla_d": False})
    with pytest.raises(SystemExit, match="options are OPTION=VALUE, got 'xla_a'"):
        profile_decode.parse_variant("g:xla_a")
    with pytest.raises(SystemExit, match="unknown model 'gemma'; choose from random, gemma-random"):
        profile_decode.main(["--model", "gemma"])
    with pytest.raises(SystemExit, match="--new-tokens must be >= 2"):
        profile_decode.main(["--new-tokens", "1"])


def test_small_run_reports_timings_variants_and_a_trace(tmp_path, capsys):
    doc = profile_decode.main(["--model", "random", "--weights", "float32", "--new-tokens", "4", "--repeats", "1",
                               "--variant", "bad:xla_no_such_option=1", "--huge-pages", "1",
                               "--fused-projections-ab", "1", "--out", str(tmp_path / "p.json")])
    t = doc["timings"]["default"]
    for k in ("whole", "streamed", "per_token_calls"):
        assert t[f"{k}_decode_ms_per_step"] > 0
    assert "No such compile option" in doc["timings"]["bad"]["error"]  # the run goes on
    h = doc["huge_pages"]
    assert len(h["ms_per_step"]["4k"]) == len(h["ms_per_step"]["huge"]) == 1 and h["median_huge_ms"] > 0
    assert h["collapse"]["bytes"] + h["collapse"]["failed"] > 0  # the embedding has whole 2 MiB pages
    f = doc["fused_projections"]
    assert len(f["ms_per_step"]["fused"]) == len(f["ms_per_step"]["apart"]) == 1 and f["median_apart_ms"] > 0
    lines = doc["trace_whole"]["lines"]
    assert any(x["thread"] == "python" for x in lines) and sum(x["events"] for x in lines) > 0
    assert "costliest on" in capsys.readouterr().out


def test_collapse_huge_pages_accounts_for_every_whole_page():
    """The whole 2 MiB pages inside an array are collapsed or counted as refused, and collapsed
    ones show as AnonHugePages of the array's mapping (where the kernel refuses, the errno is
    kept: THP off, or Linux < 6.1)."""
    import re
    from pathlib import Path

    import jax.numpy as jnp

    x = jnp.arange(3 << 20, dtype=jnp.float32) * 2  # 12 MiB: at least five whole 2 MiB pages
    start = x.unsafe_buffer_pointer()
    pages = ((start + x.nbytes) // profile_decode.HUGE_PAGE) - (-(-start // profile_decode.HUGE_PAGE))
    out = profile_decode.collapse_huge_pages([x])
    assert pages >= 5 and out["bytes"] + out["failed"] * profile_decode.HUGE_PAGE == pages * profile_decode.HUGE_PAGE
    assert (out["failed"] == 0) == (out["errno"] == 0)
    if out["bytes"]:
        huge_kb = 0
        for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
            lo, hi = (int(v, 16) for v in block.split()[0].split("-"))
            if lo < start + x.nbytes and start < hi:
                huge_kb += int(re.search(r"AnonHugePages:\s+(\d+)", block).group(1))
        assert huge_kb * 1024 >= out["bytes"]
    assert float((x[-1] / 2)) == (3 << 20) - 1  # the data stay


def test_huge_pages_refusals(monkeypatch):
    import jax

    for flag in ("--huge-pages", "--fused-projections-ab"):
        with pytest.raises(SystemExit, match="--huge-pages and --fused-projections-ab must be >= 0 rounds"):
            profile_decode.main([flag, "-1"])
    with pytest.raises(SystemExit, match="pass --weights gguf"):
        profile_decode.main(["--model", "gemma-gguf", "--weights", "int8"])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit, match="--huge-pages: CPU backend on Linux only"):
        profile_decode.huge_page_ab(None, [[1, 2]], 4, 1)
