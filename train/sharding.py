"""The device mesh and the rules that map logical axis names onto it.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded over it), ``expert`` (the experts of mixture-of-experts layers are
divided over it; the rest of the model treats it as data parallelism) and ``tensor`` (model
parallelism over the mixers' inner width or heads, the MLP's hidden width and the vocabulary). The same code runs on one device,
one host of 8, or many hosts: ``jax.devices()`` spans every process once
``jax.distributed.initialize()`` has run.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axes (None: replicated). Rules are data, read by flax's logical helpers.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("inner", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("kv", None),
    ("state", None),
    ("conv", None),
    ("proj", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in one -1 entry so that the product is ``num_devices``; checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape must give {len(MESH_AXES)} positive sizes for {MESH_AXES} "
                     f"(one may be -1), got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh_shape {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over ``MESH_AXES`` with explicit ``AxisType.Auto`` axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                           axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a pytree of (possibly logically annotated) values or shapes.

  Leaves boxed by ``nn.with_logical_partitioning`` get their mapped spec; others are replicated.
  """
  specs = nn.get_partition_spec(tree)
  specs = nn.logical_to_mesh(specs, LOGICAL_RULES)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[batch, time] arrays: batch over (data, fsdp, expert), time replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"), None))
