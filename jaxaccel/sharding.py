"""Device meshes and the one table that maps logical axis names onto them.

`layers.py` names every parameter dimension (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
`norm`) and constrains activations (`batch`, `length`, `embed`, `mlp`); `RULES` below maps
those names onto the mesh axes `data`, `fsdp` and `tensor`. Nothing else in the package
knows about meshes: params, optimizer state, KV caches and batches all get their
`NamedSharding` from `RULES` here.

Divisibility policy, one rule for params, KV caches and batches: a dimension that a mesh axis
does not divide is kept whole (replicated) on that axis, so every mesh whose product matches
the device count loads every model; that is always exact, only less parallel. `heads` and
`kv_heads` count whole heads (a head is never split across devices): Gemma 3 270M's single KV
head is replicated on any tensor axis, as its cache's head axis is. Padding is never used (a
padded vocabulary would change the logits' shape). `replicated_dims` / `replication_note` say
which parameter dimensions were kept whole; loading over such a mesh warns once with the note.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .kv_cache import init_cache as make_cache
from .models import registry

AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes, in priority order: a mesh axis already used by an earlier
# dimension of the same array is skipped (activations [batch, length, embed] shard the
# batch over data x fsdp and keep embed whole; params [vocab, embed] shard both).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("norm", None),
    ("head_dim", None),
)
CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # KV cache [B, S, K, H]


@dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over (data, fsdp, tensor); one axis may be -1 = all remaining devices.

    data: batch replicas; fsdp: params and optimizer state split along `embed`, batch split
    too; tensor: heads / MLP / vocab split (Megatron-style).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        """Resolve -1 against `n_devices`; clear errors when the product cannot match."""
        sizes = (self.data, self.fsdp, self.tensor)
        text = " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
        if any(not isinstance(s, (int, np.integer)) or (s < 1 and s != -1) for s in sizes):
            raise ValueError(f"mesh {text}: every axis must be a positive integer or -1 (= the remaining devices)")
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {text}: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh {text}: the fixed axes ({known} devices) do not divide the "
                                 f"{n_devices} available devices; pick sizes whose product divides {n_devices}")
            sizes = tuple(n_devices // known if s == -1 else s for s in sizes)
        elif known != n_devices:
            raise ValueError(f"mesh {text} needs {known} devices but {n_devices} are available "
                             f"({jax.default_backend()}); make the product {n_devices} or set one axis to -1")
        return tuple(int(s) for s in sizes)

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES)


def parse_mesh(text: str) -> MeshConfig:
    """'data=2,fsdp=2,tensor=2' -> MeshConfig. Unspecified axes are 1, except data, which takes
    the remaining devices (-1) unless another axis already does: 'tensor=2' on 8 devices is 4 x 1 x 2."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"bad mesh entry {part!r} in {text!r}: use axis=size with axes {', '.join(AXES)}, "
                             "e.g. data=2,fsdp=2,tensor=2")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh size {value!r} for {name}: an integer or -1 is needed") from None
    if not sizes:
        raise ValueError(f"empty mesh {text!r}: use e.g. data=2,fsdp=2,tensor=2")
    rest = "data" not in sizes and -1 not in sizes.values()
    return MeshConfig(**{"data": -1 if rest else 1, "fsdp": 1, "tensor": 1, **sizes})


def build_mesh(mesh: MeshConfig | Mesh | str | tuple | None = None, devices=None) -> Mesh:
    """A `Mesh` over all devices of all processes (or `devices`), axes (data, fsdp, tensor)."""
    if isinstance(mesh, Mesh):
        return mesh
    if mesh is None:
        mesh = MeshConfig()
    elif isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    elif isinstance(mesh, tuple):
        mesh = MeshConfig(*mesh)
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh.shape(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


# --- logical names -> PartitionSpec --------------------------------------------------------
def _axes_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


@dataclass(frozen=True)
class Replicated:
    """A dimension kept whole on a mesh axis that does not divide it (one per dropped axis)."""

    dim: int  # which dimension of the array
    name: str  # its logical name ('vocab', 'kv_heads', ...)
    size: int  # its size, in heads for 'heads' / 'kv_heads'
    axis: str  # the mesh axis it is replicated on
    axis_size: int

    def __str__(self) -> str:
        if self.name in ("heads", "kv_heads"):
            what = f"{self.size} {'KV ' * (self.name == 'kv_heads')}head{'s' * (self.size != 1)}"
        else:
            what = f"{self.name} {self.size}"
        return f"{what} on {self.axis}={self.axis_size}"


def plan_spec(names, shape, mesh: Mesh, units=None) -> tuple[P, tuple[Replicated, ...]]:
    """Logical names of each dimension -> (PartitionSpec by `RULES`, the dimensions kept whole).

    A dimension its mesh axes do not divide drops axes from the end of its rule until they do
    (finally replicated); each dropped axis of size > 1 is reported. units: logical name ->
    elements per unit (a head's width for the flattened `heads` / `kv_heads` of a kernel), so
    divisibility is counted in whole heads.
    """
    rules = dict(RULES)
    used, out, dropped = set(), [], []
    for dim, (name, size) in enumerate(zip(names, shape)):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in jaxaccel.sharding.RULES")
        axes = rules.get(name) if name is not None else None
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in used)
        unit = (units or {}).get(name, 1)
        count = size // unit if size % unit == 0 else size
        while axes and count % _axes_size(mesh, axes):
            dropped.append(Replicated(dim, name, int(count), axes[-1], int(mesh.shape[axes[-1]])))
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out), tuple(dropped)


def logical_spec(names, shape, mesh: Mesh, units=None) -> P:
    """Logical names of each dimension -> PartitionSpec (see plan_spec)."""
    return plan_spec(names, shape, mesh, units)[0]


def _param_table(cfg, mesh: Mesh, dtype="float32") -> dict:
    """Flat param path -> (shape, NamedSharding, dimensions kept whole), from abstract params."""
    boxed = registry.abstract_params(cfg, dtype)
    names = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    shapes = traverse_util.flatten_dict(meta.unbox(boxed))
    units = {"heads": cfg.head_dim, "kv_heads": cfg.head_dim}  # q/k/v/o kernels hold heads x head_dim
    table = {}
    for path, s in shapes.items():
        spec, dropped = plan_spec(tuple(names[path]) or (None,) * len(s.shape), s.shape, mesh, units)
        table[path] = (s.shape, NamedSharding(mesh, spec), dropped)
    return table


def replicated_dims(cfg, mesh: Mesh, dtype="float32") -> dict[str, tuple[Replicated, ...]]:
    """'path/of/param' -> its dimensions kept whole on a mesh axis that does not divide them
    (only params that have one): the sharding plan's exceptions, for reports."""
    return {"/".join(p): d for p, (_, _, d) in _param_table(cfg, mesh, dtype).items() if d}


def replication_note(cfg, mesh: Mesh, dtype="float32") -> str | None:
    """One line naming what `mesh` keeps whole for `cfg` (None when every dimension divides),
    e.g. '... 1 KV head on tensor=8 (36 params), vocab 97 on tensor=8 (2 params)'."""
    return _note(_param_table(cfg, mesh, dtype), mesh)


def _note(table: dict, mesh: Mesh) -> str | None:
    counts: dict[str, int] = {}
    for _, _, dropped in table.values():
        for d in dict.fromkeys(str(d) for d in dropped):
            counts[d] = counts.get(d, 0) + 1
    if not counts:
        return None
    whole = sum(1 for _, _, d in table.values() if d)
    what = ", ".join(f"{k} ({n} param{'s' * (n > 1)})" for k, n in counts.items())
    return (f"mesh {describe(mesh)}: {whole} of {len(table)} params are replicated on a mesh axis that does not "
            f"divide them (exact; less memory saved): {what}")


def param_shardings(cfg, mesh: Mesh, dtype="float32"):
    """Params pytree of `NamedSharding`; warns (once per message) with `replication_note` when
    the mesh keeps some dimension whole: every params placement (load, shard, init) passes here."""
    table = _param_table(cfg, mesh, dtype)
    note = _note(table, mesh)
    if note:
        warnings.warn(note, stacklevel=2)
    return traverse_util.unflatten_dict({p: sh for p, (_, sh, _) in table.items()})


def shardings_like(tree, cfg, mesh: Mesh):
    """Shardings for any pytree holding params-shaped subtrees (optimizer state, a TrainState):
    a leaf whose dict-key path ends with a param's path and has that param's shape gets its
    sharding; every other leaf (step counters, factored statistics, adapters) is replicated."""
    table = _param_table(cfg, mesh)
    replicated = NamedSharding(mesh, P())

    def pick(key_path, leaf):
        keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            shape, s, _ = table.get(keys[i:], (None, None, None))
            if shape is not None and tuple(shape) == tuple(np.shape(leaf)):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def shard_state(state, cfg, mesh: Mesh):
    """Place a train state (params + optimizer state + counters) over `mesh` (see shardings_like)."""
    return jax.device_put(state, shardings_like(state, cfg, mesh))


def abstract_like(tree, cfg, mesh: Mesh):
    """ShapeDtypeStructs of `tree` (arrays or abstract) carrying the shardings of `mesh`: the
    target for restoring a checkpoint onto this mesh, whatever mesh it was saved from."""
    tree = jax.eval_shape(lambda t: t, tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                        shardings_like(tree, cfg, mesh))


# --- placing things --------------------------------------------------------------------------
def from_host(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array (the same global value on every process) -> global array; each device
    copies only its own slice, so the whole array never lands on one device."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def placer(cfg, mesh: Mesh, dtype="float32"):
    """`placer(path, host_array)` for the checkpoint loaders: each device receives its shard."""
    shardings = traverse_util.flatten_dict(param_shardings(cfg, mesh, dtype))
    return lambda path, array: from_host(array, shardings[path])


def shard_params(params, cfg, mesh: Mesh):
    """Re-place an existing params pytree over `mesh`."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def shard(model, mesh) -> Any:
    """A copy of `model` whose params are sharded over `mesh` (MeshConfig / Mesh / 'data=..')."""
    mesh = build_mesh(mesh)
    return dataclasses.replace(model, params=shard_params(model.params, model.config, mesh), mesh=mesh)


def init_params(cfg, mesh: Mesh, seed: int = 0, dtype="float32"):
    """Sharded random init: eval_shape -> partition specs -> jit(init, out_shardings=...).
    Equal to the single-device init of the same seed (partitionable threefry)."""
    module = registry.build(cfg, dtype)
    init = lambda key: meta.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, dtype))(jax.random.PRNGKey(seed))


def batch_sharding(shape, mesh: Mesh) -> NamedSharding:
    """[B, ...] arrays: batch over data x fsdp (fewer axes when B does not divide)."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def shard_batch(batch, mesh: Mesh):
    """A pytree of host [B, ...] arrays -> global arrays split over the batch axes (each
    process passes the same global batch; each device copies only its rows)."""
    return jax.tree.map(lambda a: from_host(np.asarray(a), batch_sharding(np.shape(a), mesh)), batch)


def cache_shardings(cache, mesh: Mesh):
    """KV cache pytree (see kv_cache.init_cache) -> shardings: [B] index by batch, k/v by CACHE_AXES."""
    names = lambda x: ("batch",) if x.ndim == 1 else CACHE_AXES
    return jax.tree.map(lambda x: NamedSharding(mesh, logical_spec(names(x), x.shape, mesh)), cache)


def init_cache(cfg, batch: int, length: int, dtype=jnp.float32, mesh: Mesh | None = None):
    """kv_cache.init_cache, created directly sharded over `mesh` when one is given."""
    fn = partial(make_cache, cfg, batch, length, dtype)
    if mesh is None:
        return fn()
    return jax.jit(fn, out_shardings=cache_shardings(jax.eval_shape(fn), mesh))()


def activate(mesh: Mesh):
    """Context for tracing with activation constraints (`nn.with_logical_constraint`) on:
    `with sharding.activate(mesh): jitted(...)`. Outside it those constraints are no-ops."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules([(k, v) for k, v in RULES]))
    return stack


# --- reporting -------------------------------------------------------------------------------
def bytes_per_device(tree) -> dict:
    """device -> bytes of `tree`'s shards that live on it (addressable devices only)."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for s in leaf.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.devices.size} {jax.default_backend()} devices)"
