"""bench.matvec (the decode-step matmuls one by one, kernel against XLA's dot) runs end to end at
tiny sizes, reports what it says it reports, and refuses bad options. No timing is asserted."""

import json

import jax
import pytest

from bench import matvec
from bench.common import random_config


def test_shapes_are_the_weights_a_decode_step_multiplies_by():
    """model_shapes lists exactly the (K, N) of the random Llama's layer kernels and lm_head."""
    import jaxaccel

    config = random_config("random")
    params = jax.eval_shape(lambda: jaxaccel.init_random(config, seed=0).params)
    dense = {tuple(leaf.shape) for leaf in jax.tree.leaves(params["layers_0"]) if leaf.ndim == 2}
    got = {(K, N) for _, K, N, axis in matvec.model_shapes(config) if axis == 0}
    lm_head = next(s for s in matvec.model_shapes(config) if "lm_head" in s[0])
    assert got - {(lm_head[1], lm_head[2])} == dense
    assert lm_head[1:3] == (config.hidden_size, config.vocab_size)  # untied: [hidden, vocab]
    gemma = random_config("gemma-random")
    # the tied embedding [vocab, hidden] as attend multiplies it: hidden inputs, vocab outputs
    assert matvec.model_shapes(gemma)[-1] == ("embedding (tied lm_head)", gemma.hidden_size, gemma.vocab_size, 1)


def test_tiny_run_reports_kernel_and_xla_against_the_read_bandwidth(tmp_path, capsys):
    out = tmp_path / "m.json"
    doc = matvec.main(["--model", "random", "--shapes", "k_proj,down", "--mib", "1", "--repeats", "1",
                       "--probe-mib", "8", "--rows", "2", "--dtype", "bfloat16", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["rows"] == 2
    assert [r["weight"] for r in doc["results"]] == ["k_proj / v_proj", "down_proj"]
    for r in doc["results"]:
        assert r["kernel"]["bytes"] == r["K"] * r["N"] * 2 and r["kernel"]["copies"] >= 1
        assert r["kernel"]["s"] > 0 and r["xla"]["s"] > 0
        assert r["kernel_pct_read"] == pytest.approx(100 * r["kernel"]["bytes"] / r["kernel"]["s"] / r["read_bw"])
    table = capsys.readouterr().out
    assert "kernel / XLA speed" in table and "down_proj" in table


@pytest.mark.parametrize("dtype,per_weight", [("int8", 1.0), ("int4", 0.5)])
def test_integer_weights_are_timed_as_stored_with_their_scales(dtype, per_weight, tmp_path):
    """int8 / int4 shapes go through the integer kernels and XLA's dequantize-then-dot, and their
    bytes count the codes and the float32 scales (and int4's zeros) that each product reads."""
    doc = matvec.main(["--model", "random", "--shapes", "k_proj,lm_head", "--mib", "1", "--repeats", "1",
                       "--probe-mib", "8", "--dtype", dtype, "--out", str(tmp_path / "m.json")]
                      + (["--no-xla"] if dtype == "int4" else []))
    for r in doc["results"]:
        K, N = r["K"], r["N"]
        groups = K // 32 if dtype == "int4" else 1
        extra = N * groups * 4 * (2 if dtype == "int4" else 1)
        assert r["kernel"]["bytes"] == int(K * N * per_weight) + extra
        assert r["kernel"]["s"] > 0 and (r["xla"] is None if dtype == "int4" else r["xla"]["s"] > 0)


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_K"])
def test_gguf_blocks_are_timed_as_stored(dtype, tmp_path, capsys):
    """A GGUF type's shapes go through the block kernel and XLA's dequantize-then-dot, their bytes
    are the blocks' (scales inside); shapes whose inputs the block does not divide are skipped."""
    from jaxaccel.kernels import ggml

    doc = matvec.main(["--shapes", "o_proj,gate", "--mib", "1", "--repeats", "1", "--probe-mib", "8",
                       "--dtype", dtype, "--out", str(tmp_path / "m.json")])
    _, inputs, nbytes = ggml.BLOCKS[dtype]
    names = [r["weight"] for r in doc["results"]]
    assert names == (["o_proj", "gate_proj / up_proj"] if dtype == "Q8_0" else ["o_proj"])
    for r in doc["results"]:
        assert r["kernel"]["bytes"] == r["N"] * r["K"] // inputs * nbytes
        assert r["kernel"]["s"] > 0 and r["xla"]["s"] > 0
    if dtype == "Q4_K":
        assert "skipped (inputs not a multiple of Q4_K's 256): gate_proj / up_proj" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--rows", "9"], "--rows must be in 1..8"),
    (["--dtype", "int3"], "--dtype must be one of float32, bfloat16, int8, int4, Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, got 'int3'"),
    (["--dtype", "Q4_K", "--shapes", "k_proj,gate"], "no shape of gemma-random has inputs a multiple of Q4_K's block of 256"),
    (["--mib", "0"], "--mib, --repeats and --probe-mib must be >= 1"),
    (["--shapes", "nonsense"], "--shapes 'nonsense' matches none of"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        matvec.main(argv + ["--out", "/nonexistent/never-written.json"])
    assert message in capsys.readouterr().err


def test_other_backends_are_refused(monkeypatch):
    """The kernel is a CPU one: on a GPU / TPU backend the bench says so instead of timing XLA alone."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    message = "needs the CPU backend and a C\\+\\+ compiler \\(backend gpu, kernels not tried\\)"
    with pytest.raises(SystemExit, match=message):
        matvec.main(["--out", "/nonexistent/never-written.json"])
