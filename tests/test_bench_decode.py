"""The decode benchmark runs end to end (tiny sizes) and reports what the issue asks for: both
implementations' speeds, their ratio, the greedy agreement, and roofline fractions against the
bandwidth sampled beside each implementation's timed runs. No timing is asserted."""

import json

import pytest

from bench import decode


def test_quick_run_reports_rooflines_from_adjacent_bandwidth(tmp_path, capsys):
    out = tmp_path / "decode.json"
    doc = decode.main(["--quick", "--batch", "1", "--new-tokens", "4", "--repeats", "2", "--no-stream",
                       "--out", str(out)])
    assert json.loads(out.read_text())["results"][0]["batch"] == 1
    (r,) = doc["results"]
    assert r["agreement"]["min_common_prefix"] == 4  # float32 greedy equals transformers'
    for impl in ("jaxaccel", "transformers"):
        v = r[impl]
        assert len(v["bandwidth_samples"]) == 2  # one sample before each timed run
        step = r["roofline"]["bytes_per_step"]["total"]
        bw = v["adjacent_bandwidth_bytes_s"]["copy"]
        assert v["roofline_tok_s"] == pytest.approx(bw / step)
        assert v["roofline_fraction"] == pytest.approx(v["decode_tok_s"] / v["roofline_tok_s"])
        assert v["read_roofline_fraction"] == pytest.approx(
            v["decode_tok_s"] * step / v["adjacent_bandwidth_bytes_s"]["read"])
    table = capsys.readouterr().out
    assert "% read roof" in table and "ratio jax/pt" in table


def test_quick_run_samples_on_both_sides(tmp_path):
    """--temperature / --top-p: both implementations sample (no greedy agreement to check)."""
    doc = decode.main(["--quick", "--batch", "1", "--new-tokens", "4", "--repeats", "1", "--no-stream",
                       "--temperature", "1.0", "--top-p", "0.9", "--out", str(tmp_path / "s.json")])
    (r,) = doc["results"]
    assert r["agreement"] is None and doc["settings"]["sampling"]["top_p"] == 0.9
    assert r["jaxaccel"]["decode_tok_s"] > 0 and r["transformers"]["decode_tok_s"] > 0
    with pytest.raises(SystemExit, match="need --temperature"):
        decode.main(["--quick", "--top-p", "0.9", "--out", str(tmp_path / "g.json")])
