"""`jaxaccel accelerate`'s variants: what each one is (`Variant`), which apply to a task and to
the devices present (`variants_for`), and how one is made from the model as loaded (`build`).

A variant differs from the loaded model by at most: its quantization (`quant`), its speculative
drafter (`speculative`), running un-jitted (`eager`), XLA's ops instead of the CPU kernels
(`kernels_off`: generation's programs built with `KernelChoice()` through `Model.kernels`) and a
device mesh its params are sharded over (`mesh`, only when more than one device is present).
The kernels-off row is measured for the fastest integer variant measured before it
(`kernels_off_twin`), so the report shows what the kernels buy; it is never chosen.

When the source is a GGUF file (or the embedded Gemma, whose source is one), "GGUF as stored"
serves the file's own quantized tensors as its blocks store them: it is made from the source, not
from the loaded model (`jaxaccel.load(gguf, gguf_weights="as_stored")`, quant_ggml.py), and saved
as that model's serving folder when chosen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import jax

from . import sharding
from .default_models import GEMMA
from .kernels import KernelChoice
from .model import load
from .quant import QuantConfig

BASELINE = "float32 jit"
KERNELS_OFF = "XLA's ops (kernels off)"  # the suffix of a kernels-off row's name
MESH_AXES = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class Variant:
    name: str
    quant: QuantConfig | None = None  # None: the model as loaded (float32)
    speculative: str | None = None
    eager: bool = False  # un-jitted step by step (jax.disable_jit): the newcomer's baseline
    # the time to measure it as a multiple of float32 jit's (an estimate, from the embedded Gemma on
    # a 2-core CPU): variants are measured cheapest first, and a time budget skips those that would not fit
    cost: float = 1.0
    kernels_off: bool = False  # generation through XLA's ops instead of the CPU kernels (a comparison row)
    mesh: tuple[int, int, int] | None = None  # (data, fsdp, tensor): params sharded over that mesh
    same_as: str | None = None  # a kernels-off row: the variant it repeats with XLA's ops
    gguf_as_stored: bool = False  # the source GGUF's quantized tensors as stored (loaded from the source)

    @property
    def mesh_text(self) -> str | None:
        """'data=4,fsdp=1,tensor=1' (what `--mesh` takes), or None."""
        return None if self.mesh is None else ",".join(f"{a}={n}" for a, n in zip(MESH_AXES, self.mesh))

    def identity(self) -> dict:
        """The fields every report row of this variant starts with."""
        row = {"variant": self.name, "kind": "variant", "quant": None if self.quant is None else json.loads(
            self.quant.to_json()), "speculative": self.speculative}
        if self.kernels_off:
            row.update(kernels="xla", same_as=self.same_as)
        if self.mesh is not None:
            row["mesh"] = self.mesh_text
        return row


# resolved into the fastest integer variant measured before it (kernels_off_twin)
BEST_INTEGER_KERNELS_OFF = Variant(f"the fastest integer variant, {KERNELS_OFF}", kernels_off=True, cost=1.5)


def lm_variants() -> list[Variant]:
    return [Variant("float32 eager", eager=True, cost=0.5), Variant(BASELINE),
            Variant("bfloat16", QuantConfig(mode="bfloat16")), Variant("float16", QuantConfig(mode="float16"), cost=1.5),
            Variant("int8 per channel", QuantConfig(mode="int8")),
            Variant("int8 g32", QuantConfig(mode="int8", int8_group_size=32), cost=1.1),
            Variant("int8 + int8 KV cache", QuantConfig(mode="int8", kv_cache_int8=True), cost=1.2),
            Variant("int4 g32", QuantConfig(mode="int4", group_size=32), cost=2.0),
            Variant("int4 g128", QuantConfig(mode="int4", group_size=128), cost=2.0),
            Variant("w8a8", QuantConfig(mode="w8a8"), cost=2.5),
            Variant("prompt lookup", speculative="prompt_lookup", cost=1.2),
            Variant("int8 self-draft", speculative="self:int8", cost=1.6),
            BEST_INTEGER_KERNELS_OFF]


def encoder_variants() -> list[Variant]:
    return [Variant(BASELINE), Variant("bfloat16", QuantConfig(mode="bfloat16")),
            Variant("float16", QuantConfig(mode="float16"), cost=1.5),
            Variant("int8 per channel", QuantConfig(mode="int8")), Variant("w8a8", QuantConfig(mode="w8a8"), cost=2.0)]


def mesh_variants(n_devices: int) -> list[Variant]:
    """float32 over each one-axis layout of `n_devices` (data, fsdp, tensor); none on one device."""
    if n_devices < 2:
        return []
    layouts = [tuple(n_devices if a == axis else 1 for a in MESH_AXES) for axis in MESH_AXES]
    return [Variant(f"{BASELINE}, mesh {axis}={n_devices}", mesh=shape, cost=1.5)
            for axis, shape in zip(MESH_AXES, layouts)]


GGUF_AS_STORED = Variant("GGUF as stored", gguf_as_stored=True, cost=1.2)


def is_gguf(source: str | None) -> bool:
    """Whether the --model argument is a GGUF file (the embedded Gemma's source is one)."""
    return source == GEMMA or (source is not None and str(source).lower().endswith(".gguf"))


def variants_for(task: str, n_devices: int | None = None, source: str | None = None) -> list[Variant]:
    """The task's variants; "GGUF as stored" when `source` (the --model argument) is a GGUF file;
    the mesh layouts when more than one device is present (`n_devices`; None: jax's device count)."""
    if n_devices is None:
        n_devices = jax.device_count()
    gguf = [GGUF_AS_STORED] if task == "generate" and is_gguf(source) else []
    return (lm_variants() if task == "generate" else encoder_variants()) + gguf + mesh_variants(n_devices)


def variant_named(name: str, task: str, source: str | None = None) -> Variant:
    return next(v for v in variants_for(task, source=source) if v.name == name)


def kernels_off_twin(rows: list[dict], jobs: list, rate) -> Variant | None:
    """The kernels-off row's variant: the fastest integer variant measured so far (`rate(row)`),
    not speculative, not sharded, its outputs finite, with XLA's ops; None when there is none."""
    by_name = {j.name: j for j in jobs if isinstance(j, Variant)}
    integer = lambda v: (v is not None and v.quant is not None and v.quant.integer and not v.speculative
                         and not v.kernels_off and v.mesh is None)
    measured = [r for r in rows if "skipped" not in r and "speed" in r and integer(by_name.get(r["variant"]))
                and "non_finite" not in r["quality"]]
    best = max(measured, key=rate, default=None)
    if best is None:
        return None
    v = by_name[best["variant"]]
    return dataclasses.replace(v, name=f"{v.name}, {KERNELS_OFF}", kernels_off=True, same_as=v.name)


def build(model, v: Variant, step=lambda text: None, source: str | None = None):
    """The Model that serves `v`, made from the loaded (float) `model` (GGUF as stored: from `source`)."""
    if v.gguf_as_stored:
        step("loading the GGUF's tensors as stored")
        return load(source, gguf_weights="as_stored")
    m = model
    if v.quant is not None:
        step(f"quantizing ({v.quant.mode})")
        m = m.quantize(v.quant)
    if v.kernels_off:
        m = dataclasses.replace(m, kernels=KernelChoice())  # XLA's ops in generation's programs too
    if v.mesh is not None:
        step(f"sharding over {v.mesh_text}")
        m = sharding.shard(m, sharding.MeshConfig(*v.mesh))
    return m
