"""The decode benchmark runs end to end (tiny sizes) and reports what the issue asks for: both
implementations' speeds, their ratio, the greedy agreement, and roofline fractions against the
bandwidth sampled beside each implementation's timed runs. No timing is asserted."""

import json

import pytest

from bench import common, decode


@pytest.mark.slow  # a whole quick benchmark run (20-45 s): CI's slow run
def test_quick_run_reports_rooflines_from_adjacent_bandwidth(tmp_path, capsys):
    out = tmp_path / "decode.json"
    doc = decode.main(["--quick", "--batch", "2", "--new-tokens", "4", "--repeats", "2", "--no-stream",
                       "--weights", "int8", "--peak-bw", "100", "--out", str(out)])
    assert json.loads(out.read_text())["results"][0]["batch"] == 2
    (r,) = doc["results"]
    assert r["agreement"]["min_common_prefix"] == 4  # float32 greedy equals transformers'
    f32_step = r["roofline"]["bytes_per_step"]["total"]
    for impl, v in [("jaxaccel", r["jaxaccel"]), ("transformers", r["transformers"]), *r["variants"].items()]:
        assert len(v["bandwidth_samples"]) == 2, impl  # one sample before each timed run
        step = v.get("bytes_per_step", {}).get("total", f32_step)
        bw = v["adjacent_bandwidth_bytes_s"]
        assert v["roofline_tok_s"] == pytest.approx(2 * bw["copy"] / step)  # B = 2 rows a step
        assert v["roofline_fraction"] == pytest.approx(v["decode_tok_s"] / v["roofline_tok_s"])
        assert v["read_roofline_fraction"] == pytest.approx(v["decode_tok_s"] / 2 * step / bw["read"])
        assert v["mbu"] == pytest.approx(v["decode_tok_s"] / 2 * step / 100e9)  # --peak-bw 100 (GB/s)
    int8 = r["variants"]["jaxaccel int8"]
    assert int8["bytes_per_step"]["total"] < f32_step / 3
    f32_roof = 2 * int8["adjacent_bandwidth_bytes_s"]["copy"] / f32_step  # tok/s at float32's bytes
    assert int8["f32_roofline_fraction"] == pytest.approx(int8["decode_tok_s"] / f32_roof)
    table = capsys.readouterr().out
    assert "% read roof" in table and "ratio jax/pt" in table and "% peak BW" in table
    int8_line = next(line for line in table.splitlines() if "| " in line and "jaxaccel int8" in line)
    assert int8_line.split("|")[-1].strip() == f"{100 * int8['mbu']:.1f}"  # each run's own MBU cell
    assert doc["settings"]["peak_bandwidth_bytes_s"] == 100e9 and doc["settings"]["torch_device"] == "cpu"


@pytest.mark.slow  # a whole quick benchmark run (20-45 s): CI's slow run
def test_quick_run_samples_on_both_sides(tmp_path):
    """--temperature / --top-p: both implementations sample (no greedy agreement to check)."""
    doc = decode.main(["--quick", "--batch", "1", "--new-tokens", "4", "--repeats", "1", "--no-stream",
                       "--temperature", "1.0", "--top-p", "0.9", "--out", str(tmp_path / "s.json")])
    (r,) = doc["results"]
    assert r["agreement"] is None and doc["settings"]["sampling"]["top_p"] == 0.9
    assert r["jaxaccel"]["decode_tok_s"] > 0 and r["transformers"]["decode_tok_s"] > 0
    with pytest.raises(SystemExit, match="need --temperature"):
        decode.main(["--quick", "--top-p", "0.9", "--out", str(tmp_path / "g.json")])
    with pytest.raises(SystemExit, match="--peak-bw must be a bandwidth in GB/s > 0, got -5.0"):
        decode.main(["--quick", "--peak-bw", "-5", "--out", str(tmp_path / "g.json")])
    with pytest.raises(SystemExit, match="unknown model 'gemma-7b'; choose from random, gemma, gemma-random"):
        decode.main(["--quick", "--models", "gemma-7b", "--out", str(tmp_path / "g.json")])


def test_bad_prompt_lengths_are_refused_before_any_run(capsys):
    """--prompt-len takes one token count or a comma list (32,512: a run per length)."""
    for bad, message in (("32,x", "must be token counts such as 32 or 32,512, got '32,x'"), ("0", "must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            decode.main(["--quick", "--prompt-len", bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_device_bandwidth_probe_measures_the_backend_memory():
    """The accelerator runs' probe (jitted copy and sum) works on any backend; on the CPU here."""
    with common.DeviceBandwidthProbe(4 << 20) as probe:
        m = probe.measure(2)
        s = probe.sample()
    assert m["array_bytes"] == 4 << 20 and m["copy"] > 0 and m["read"] > 0 and set(s) == {"copy", "read"}
    assert decode.probe_class() is common.BandwidthProbe  # the CPU backend: host memory
    bw = decode.start_bandwidth(common.DeviceBandwidthProbe, 4)  # what an accelerator run prints first
    assert bw["copy"] > 0 and bw["read"] > 0 and bw["calls_per_timing"] == 10
    assert decode.datasheet_bandwidth({"accelerator": {"kind": "NVIDIA H200"}}) == 4.8e12
    assert decode.datasheet_bandwidth({"accelerator": None}) is None


def test_llama_cpp_is_built_per_isa_tier_as_the_kernels_are():
    """bench/llama_server.py: one binary per ISA tier of jaxaccel.kernels (JAXACCEL_CPU_ISA picks
    both sides' code): the avx2 build has AVX2 and no AVX-512, the generic one neither; an
    unknown tier is refused before anything is downloaded or built."""
    from bench import llama_server
    from jaxaccel import kernels

    assert set(llama_server.TIER_FLAGS) == set(kernels.ISA_TIERS)
    avx2, generic = llama_server.TIER_FLAGS["avx2"], llama_server.TIER_FLAGS["generic"]
    assert "-DGGML_AVX2=ON" in avx2 and "-DGGML_AVX512=OFF" in avx2 and "-DGGML_NATIVE=OFF" in avx2
    assert "-DGGML_AVX2=OFF" in generic and "-DGGML_AVX=OFF" in generic
    paths = {llama_server.binary_path(tier=t) for t in llama_server.TIER_FLAGS}
    assert len(paths) == 3 and llama_server.binary_path() == llama_server.binary_path(tier="native")
    with pytest.raises(ValueError, match="no llama.cpp build for ISA tier 'avx512'"):
        llama_server.build(tier="avx512", log=lambda *_: pytest.fail("must not start a build"))


def test_one_llama_cpp_version_for_the_binding_and_the_server():
    """The llama-cpp-python that the bench extra and CI's slow run install (the Python binding
    tests/test_ggml_blocks.py compares with) is the release whose sources bench/llama_server.py
    builds llama-server from, so the tests and the benches measure the same llama.cpp."""
    import re
    import tomllib
    from pathlib import Path

    from bench import llama_server

    root = Path(__file__).resolve().parent.parent
    bench_extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    assert f"llama-cpp-python=={llama_server.VERSION}" in bench_extra
    assert re.search(rf"pip install llama-cpp-python=={re.escape(llama_server.VERSION)}\n",
                     (root / ".ci" / "run").read_text())


def test_weights_int4_all_is_int4_everywhere_and_unknown_formats_are_refused():
    from jaxaccel import QuantConfig

    cfg = QuantConfig(**decode.NAMED_WEIGHTS["int4-all"])
    for path in ("embed_tokens/embedding", "layers_0/mlp/down_proj/kernel", "layers_0/self_attn/v_proj/kernel"):
        assert cfg.plan(path)[0] == "int4", path
    with pytest.raises(SystemExit, match="unknown format.*int9.*int4-all"):
        decode.main(["--quick", "--weights", "int8,int9"])
