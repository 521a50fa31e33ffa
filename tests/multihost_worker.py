"""Run by test_multihost.py, one OS process per simulated host (CPU devices, gloo collectives).

  train   COORD NPROC PID CKPT OUT : mesh data=2,fsdp=2,tensor=2 over all processes; 3 adamw
                                     steps, orbax save (all processes write), then a 4th step
  restore COORD NPROC PID CKPT OUT MESH : restore onto MESH (a different layout), then the 4th step
COORD "-" = a single process (no jax.distributed). Process 0 writes OUT (.npz): every state
leaf after step 3 (gathered from all processes) and the loss of step 4.
"""

import sys

import jax
import numpy as np

import jaxaccel
from jaxaccel import distributed, sharding, train
from jaxaccel.checkpoints import store
from jaxaccel.config import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)


FINETUNE = dict(task="sft", steps=3, batch_size=4, optimizer="sgd", lr=0.5, schedule="constant", save_every=2,
                progress=False, tensorboard=False)


def batch(step: int) -> dict:
    """The same global batch on every process; shard_batch gives each device its rows."""
    tokens = np.random.default_rng(step).integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape).copy(),
            "segments": ones, "weights": ones}


def main(mode, coord, nproc, pid, ckpt, out, mesh_text="data=2,fsdp=2,tensor=2"):
    if coord != "-":
        distributed.initialize(coord, int(nproc), int(pid))
    if mode == "finetune":  # ckpt: an HF folder with a tokenizer; out: the run folder
        from train_util import sft_rows

        model = jaxaccel.load(ckpt, mesh=sharding.parse_mesh(mesh_text))
        jaxaccel.finetune(model, sft_rows(8), out=out, **FINETUNE)
        distributed.shutdown()
        return
    mesh = sharding.build_mesh(mesh_text)
    model = jaxaccel.init_random(CFG, seed=0, mesh=mesh)
    optimizer = train.make_optimizer("adamw", 1e-2, schedule="constant")
    step_fn = train.make_train_step(model, optimizer, "sft")
    state = sharding.shard_state(train.init_state(model, optimizer), CFG, mesh)
    ckpt_tree = lambda s: {"params": s.params, "opt_state": s.opt_state, "step": s.step}
    if mode == "train":
        for i in range(3):
            state, _ = step_fn(state, sharding.shard_batch(batch(i), mesh))
        st = store.Store(ckpt, {"model": {"test": 1}}, save_every=1, async_save=False)
        st.save(3, ckpt_tree(state), force=True)
        st.wait()
        st.close()
    else:
        target = sharding.abstract_like(ckpt_tree(state), CFG, mesh)
        restored = store.restore(ckpt, target=target)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
        state = state.replace(**restored)
    saved = distributed.gather(ckpt_tree(state))
    # greedy generation on the params sharded over every process (batch split across hosts)
    served = jaxaccel.Model(CFG, state.params, None, mesh=mesh)
    tokens = np.asarray(jaxaccel.generate_tokens(served, [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], max_new_tokens=6))
    state, metrics = step_fn(state, sharding.shard_batch(batch(3), mesh))
    loss4 = float(metrics["loss"])
    if distributed.is_main():
        flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
        np.savez(out, loss4=np.asarray(loss4), generated=tokens, **flat)
        print(f"{mode}: {sharding.describe(mesh)} processes={jax.process_count()} loss4={loss4:.6f}")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
