"""Run by test_sharding.py in a subprocess with 8 CPU devices (XLA_FLAGS is read at jax import).

argv: HF folder (vocab divisible by 8), the same model as a GGUF file, a folder of HF models whose
dimensions some mesh axes do not divide (test_sharding.write_odd_models), output .npz. For the
single device and each mesh it stores logits, greedy tokens, one `jaxaccel.train` step's loss and
updated params, and measured per-device params bytes; the test compares them. Also records the
errors of the bad-input cases.

argv `odd ROOT OUT`: only the odd models, on every (data, fsdp, tensor) layout of 8 devices.
"""

import contextlib
import io
import itertools
import json
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

import jaxaccel
from jaxaccel import cli, sharding, train

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24], [40]]


def run(model, mesh, tokens, out, tag):
    optimizer = train.make_optimizer("sgd", 0.5, schedule="constant")  # linear in the gradient: tight equality
    state = train.init_state(model, optimizer)
    B, T = tokens.shape
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
             "segments": np.ones_like(tokens), "weights": np.ones_like(tokens)}
    step = train.make_train_step(model, optimizer, "sft")
    if mesh is not None:
        state = sharding.shard_state(state, model.config, mesh)
        batch = sharding.shard_batch(batch, mesh)
        with sharding.activate(mesh):  # activation constraints on while tracing
            state, metrics = step(state, batch)
        out[f"{tag}/state_devices"] = np.asarray(
            min(len(x.sharding.device_set) for x in jax.tree.leaves(state)))
        out[f"{tag}/opt_bytes"] = np.asarray(max(sharding.bytes_per_device(state.opt_state).values()))
    else:
        state, metrics = step(state, batch)
    out[f"{tag}/logits"] = np.asarray(model.logits(np.asarray(PROMPTS[0])[None]))
    out[f"{tag}/tokens"] = np.asarray([t + [-1] * (16 - len(t)) for t in
                                       jaxaccel.generate_tokens(model, PROMPTS, max_new_tokens=16)])
    # again, one call per token (as streaming does): the cache goes back in with its sharding
    # (a mesh whose tensor axis does not divide the KV heads once failed here on its second call)
    keep_going = lambda toks, first: np.zeros(toks.shape[0], bool)
    out[f"{tag}/tokens_streamed"] = np.asarray([t + [-1] * (16 - len(t)) for t in jaxaccel.generate_tokens(
        model, PROMPTS, max_new_tokens=16, host_step=keep_going)])
    out[f"{tag}/loss"] = np.asarray(metrics["loss"])
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        out[f"{tag}/param{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    per_device = sharding.bytes_per_device(model.params)
    out[f"{tag}/bytes"] = np.asarray([per_device[d] for d in jax.devices() if d in per_device])


LAYOUTS = [s for s in itertools.product((1, 2, 4, 8), repeat=3) if np.prod(s) == 8]  # every layout of 8
ODD_IDS = np.asarray([[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 90, 96, 1, 2, 3, 4, 5]])  # < 97: every odd vocabulary
NOTE = "replicated on a mesh axis that does not divide"  # in sharding.replication_note's text


def odd_shapes(root, out, logits_on, generate_on):
    """Each model under `root` (odd vocabulary, one KV head, heads fewer than the tensor axis)
    loaded over each mesh of `logits_on`: logits, the load's warnings, the plan and the placed
    specs; greedy tokens on the meshes of `generate_on` (decoders). Keys odd/<model>/..."""
    out["odd/ids"] = ODD_IDS
    for folder in sorted(Path(root).iterdir()):
        base = jaxaccel.load(folder)
        decoder = base.config.head == "causal_lm"
        generate = lambda m: np.asarray(jaxaccel.generate_tokens(m, [[5, 6, 7], [9]], max_new_tokens=8))
        out[f"odd/{folder.name}/single/logits"] = np.asarray(base.logits(ODD_IDS))
        if decoder:
            out[f"odd/{folder.name}/single/tokens"] = generate(base)
        for shape in logits_on:
            tag = f"odd/{folder.name}/mesh%d%d%d" % shape
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m = jaxaccel.load(folder, mesh=jaxaccel.MeshConfig(*shape))
            out[f"{tag}/logits"] = np.asarray(m.logits(ODD_IDS))
            if decoder and shape in generate_on:
                out[f"{tag}/tokens"] = generate(m)
            out[f"{tag}/notes"] = np.asarray([str(w.message) for w in caught if NOTE in str(w.message)], dtype=str)
            plan = sharding.replicated_dims(m.config, m.mesh)
            out[f"{tag}/plan"] = np.asarray(sorted(f"{p} {d}" for p, ds in plan.items() for d in ds), dtype=str)
            # the placed arrays follow the plan: no replicated dimension carries its axis
            specs = {"/".join(k.key for k in path): leaf.sharding.spec
                     for path, leaf in jax.tree_util.tree_leaves_with_path(m.params)}
            out[f"{tag}/plan_followed"] = np.asarray(all(
                d.axis not in jax.tree.leaves(specs[p][d.dim]) for p, ds in plan.items() for d in ds))
            out[f"{tag}/specs"] = np.asarray([f"{p} {tuple(specs[p])}" for p in sorted(specs)], dtype=str)
            if decoder:
                cache = sharding.init_cache(m.config, 2, 16, mesh=m.mesh)
                out[f"{tag}/cache_spec"] = np.asarray(str(tuple(cache["layers"][0]["k"].sharding.spec)))


def error_of(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def main(folder, gguf_file, odd_root, dest):
    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    rng = np.random.default_rng(0)
    base = jaxaccel.load(folder)
    tokens = rng.integers(0, base.config.vocab_size, (8, 12)).astype(np.int32)
    run(base, None, tokens, out, "single")
    out["total_bytes"] = np.asarray(base.params_bytes)
    for shape in MESHES:
        m = jaxaccel.load(folder, mesh=jaxaccel.MeshConfig(*shape))
        run(m, m.mesh, tokens, out, "mesh%d%d%d" % shape)
        print(f"{sharding.describe(m.mesh):45s} params bytes/device {max(out['mesh%d%d%d/bytes' % shape]):>8,}"
              f"  (single device {base.params_bytes:,})")
    # GGUF loads sharded through the same placer; an already loaded model re-placed by shard()
    ids = np.asarray(PROMPTS[0])[None]
    out["gguf_logits"] = np.asarray(jaxaccel.load(gguf_file, mesh=jaxaccel.MeshConfig(1, 2, 4)).logits(ids))
    # quantizing a sharded model: int8 serving on the mesh equals int8 on one device
    q = jaxaccel.QuantConfig(mode="int8")
    out["quant_single"] = np.asarray(base.quantize(q).logits(ids))
    out["quant_mesh"] = np.asarray(jaxaccel.load(folder, mesh=jaxaccel.MeshConfig(2, 2, 2)).quantize(q).logits(ids))
    # a float serving folder (the embedded model's cache format) loads sharded too
    from jaxaccel.checkpoints import serving

    folder_path = serving.save(base.quantize(jaxaccel.QuantConfig(mode="float32")), Path(dest).parent / "serving")
    served = jaxaccel.load(folder_path, mesh=jaxaccel.MeshConfig(1, 2, 4))
    out["serving_logits"] = np.asarray(served.logits(ids))
    out["serving_devices"] = np.asarray(len(served.params["lm_head"]["kernel"].sharding.device_set))
    moved = sharding.shard(base, jaxaccel.MeshConfig(2, 2, 2))
    out["shard_logits"] = np.asarray(moved.logits(ids))
    out["shard_devices"] = np.asarray(len(moved.params["lm_head"]["kernel"].sharding.device_set))
    # the CLI flag: same text as the single-device API
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["generate", "one two three", "--model", folder, "--mesh", "data=2,fsdp=2,tensor=2",
                       "--max-new-tokens", "8"])
    out["cli"] = np.asarray([str(rc), buf.getvalue().strip(),
                             jaxaccel.generate(base, ["one two three"], max_new_tokens=8)[0].strip()])
    # `finetune --mesh`: the same loss curve and final params as on one device
    data = Path(dest).with_suffix(".jsonl")
    data.write_text("".join(json.dumps({"prompt": f"{i} one", "completion": " two three four"}) + "\n"
                            for i in range(8)))
    for tag, extra in (("ft_single", []), ("ft_mesh", ["--mesh", "data=2,fsdp=2,tensor=2"])):
        ft_out = Path(dest).with_name(tag)
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["finetune", "--model", folder, "--data", str(data), "--steps", "3", "--batch-size", "4",
                           "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant", "--no-tensorboard",
                           "--save-every", "2", "--out", str(ft_out), *extra])
        assert rc == 0, tag
        out[f"{tag}/loss"] = np.asarray([json.loads(line)["loss"]
                                         for line in (ft_out / "metrics.jsonl").read_text().splitlines()])
        out[f"{tag}/lm_head"] = np.asarray(jaxaccel.load(ft_out).params["lm_head"]["kernel"])
        # the identical command again resumes (it must not refuse its own checkpoints)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = cli.main(["finetune", "--model", folder, "--data", str(data), "--steps", "3", "--batch-size", "4",
                           "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant", "--no-tensorboard",
                           "--save-every", "2", "--out", str(ft_out), *extra])
        out[f"{tag}/rerun"] = np.asarray([str(rc), err.getvalue()])
    # one KV head on tensor=2: the cache is replicated; generating token by token hands it back
    # each call with the sharding it came in with (XLA once returned it split on head_dim)
    cfg1 = jaxaccel.ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    one_kv = jaxaccel.init_random(cfg1, seed=0)
    keep_going = lambda toks, first: np.zeros(toks.shape[0], bool)
    out["kv1_tokens"] = np.asarray([jaxaccel.generate_tokens(m, PROMPTS[:2], max_new_tokens=8, host_step=keep_going)
                                    for m in (one_kv, sharding.shard(one_kv, jaxaccel.MeshConfig(4, 1, 2)))])
    # sharded init == single-device init of the same seed
    mesh = sharding.build_mesh(jaxaccel.MeshConfig(2, 2, 2))
    ref = jaxaccel.init_random(base.config, seed=3).params
    got = jaxaccel.init_random(base.config, seed=3, mesh=mesh).params
    out["init_max_diff"] = np.asarray(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                          for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))))
    out["init_sharded"] = np.asarray(len(got["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.device_set))
    out["err_product"] = np.asarray(error_of(lambda: jaxaccel.load(folder, mesh=jaxaccel.MeshConfig(3, 1, 1))))
    # dimensions the mesh axes do not divide: tensor 2 / 4 / 8 and fsdp x tensor 2 x 4 here,
    # every layout (and generation on each) in the slow test
    odd_shapes(odd_root, out, [(1, 1, 8), (2, 1, 4), (4, 1, 2), (1, 2, 4)], [(1, 1, 8)])
    np.savez(dest, **out)


if __name__ == "__main__":
    if sys.argv[1] == "odd":
        odd = {}
        odd_shapes(sys.argv[2], odd, LAYOUTS, LAYOUTS)
        np.savez(sys.argv[3], **odd)
    else:
        main(*sys.argv[1:])
