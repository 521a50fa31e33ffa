"""orbax checkpoint stores: async saves every N steps, keep the last K and the best by eval
loss, resume from the latest committed step, restore onto any shardings.

A step folder is `<dir>/<step>/` with two items: `state` (the train-state pytree, orbax
StandardSave: restoring onto a target of `jax.ShapeDtypeStruct`s with shardings reshards)
and `meta` (JSON: the model config and run facts). orbax writes each step under a temporary
name and renames it when committed, so a crash (even SIGKILL mid-save) leaves only committed
steps visible; uncommitted leftovers are removed when the store is next opened.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from .loaded import CheckpointError


def _options(keep: int, best: bool, async_save: bool, read_only: bool = False):
    keep_policies = [policies.LatestN(n=keep)]
    if best:  # reverse=True sorts descending, so the lowest eval loss is preserved
        keep_policies.append(policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                            keep_checkpoints_without_metrics=False))
    # The keep policy's deletions first rename a step out of the committed namespace (into
    # TRASH), and only then is it deleted (`_empty_trash`): a kill mid-delete leaves no
    # half-deleted step that still looks committed.
    return ocp.CheckpointManagerOptions(
        best_fn=(lambda m: m["eval_loss"]) if best else None, best_mode="min",
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only, read_only=read_only,
        create=not read_only, todelete_subdir=TRASH)


TRASH = ".deleted"


def _empty_trash(directory: Path) -> None:
    """Delete the steps the keep policy moved out of the way (see _options)."""
    trash = Path(directory) / TRASH
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)


def _manager(directory, options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "meta"))


class Store:
    """A checkpoint folder of one model. `meta` (JSON-able dict, e.g. {"model": config}) is
    written with every step; opening a folder whose checkpoints hold a different `meta["model"]`
    raises CheckpointError instead of resuming the wrong run.
    """

    def __init__(self, directory, meta: dict, *, save_every: int = 100, keep: int = 3, best: bool = False,
                 async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
        self.directory = Path(directory)
        # as it reads back from JSON (tuples are lists there), so a rerun compares equal
        meta = json.loads(json.dumps(meta))
        self.meta, self.save_every = meta, save_every
        self.manager = _manager(self.directory, _options(keep, best, async_save))
        _empty_trash(self.directory)  # what a killed run left there
        step = self.latest_step()
        if step is not None:
            stored = self.read_meta(step)
            for key, what in (("model", "a different model"), ("setup", "a different training setup")):
                mine, theirs = meta.get(key) or {}, stored.get(key) or {}
                # a field added since the checkpoint was written reads as None there
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                if diff:
                    raise CheckpointError(
                        f"{self.directory} holds checkpoints of {what} (step {step}; differs in "
                        f"{', '.join(diff)}); refusing to resume. Use a new --out folder, or delete "
                        f"{self.directory} to start over")

    def latest_step(self) -> int | None:
        """The newest committed step (None for an empty store)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def save(self, step: int, state: Any, eval_loss: float | None = None, force: bool = False) -> bool:
        """Start an async save of `state` at `step` when step is a multiple of save_every (or
        `force`); returns whether a save started. eval_loss ranks it for "keep the best"."""
        if step % self.save_every and not force:
            return False
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(self.meta)),
                                 metrics=metrics, force=True)

    def restore(self, step: int | None = None, target: Any = None) -> Any:
        """The state at `step` (default: latest), laid out like `target` (see module `restore`)."""
        return _restore_state(self.manager, self.directory, step, target)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        _empty_trash(self.directory)

    def close(self) -> None:
        self.manager.close()
        _empty_trash(self.directory)


def _restore_state(manager, directory, step, target):
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{directory} holds no committed checkpoint")
    if step not in manager.all_steps():
        raise CheckpointError(f"{directory} has no checkpoint of step {step}; it has {list(manager.all_steps())}")
    args = ocp.args.StandardRestore(None if target is None else abstract(target))
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]


def abstract(tree: Any) -> Any:
    """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs that keep each leaf's sharding."""
    def leaf(x):
        return x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


def restore(directory, step: int | None = None, target: Any = None) -> Any:
    """Read the state of `step` (default: the latest committed) from a store folder.

    target: a pytree like the saved state whose leaves are arrays or `jax.ShapeDtypeStruct`s
    with shardings; the result is placed (and resharded) onto those shardings, whatever the
    mesh it was saved from. Without a target, arrays come back as saved.
    """
    manager = _manager(directory, _options(1, False, False, read_only=True))
    try:
        return _restore_state(manager, directory, step, target)
    finally:
        manager.close()
