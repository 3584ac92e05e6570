"""Meshes, logical axis names, and the one rule table that maps them onto the mesh.

Every weight is created with logical axis names (`param(...)`), every large activation
is passed through `constrain(x, names)`. Which mesh axis a logical name lands on is
decided here, in `DEFAULT_RULES`, and nowhere else.

The mesh always has the axes ('data', 'fsdp', 'tensor'):
  data    pure data parallelism (the batch is split, weights are replicated);
  fsdp    the batch is split AND weights are split along their `embed` dimension;
  tensor  Megatron-style model parallelism (heads / mlp / vocab split).
A dimension whose size does not divide by its mesh axes is replicated instead
(the released 16385-row tables, for instance), never padded behind the user's back.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # weights
    ("layers", None),  # the stacked-layer axis
    ("embed", "fsdp"),
    ("heads", "tensor"),  # the H*K side of q/k/v/out projections
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("positions", None),
    ("norm", None),
    # VQGAN convs: channels are small, split output channels only
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("codebook", None),
)

_local = threading.local()


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis names (one per dimension).

    Eager sharding is off: the layout is applied by `shard_model` / jitted init with
    out_shardings, so creating a module never needs a mesh.
    """
    if len(names) != np.ndim(value):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for a {np.ndim(value)}-d value")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 for "the devices left"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by fsdp*tensor*data={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
            f"devices, but {len(devices)} are available"
        )
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_to_mesh_spec(
    names: Sequence[str | None] | P,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> P:
    """Map logical axis names to a mesh PartitionSpec via the rule table.

    A mesh axis is used at most once per spec (first dimension wins), and when `shape`
    and `mesh` are given a dimension that does not divide evenly is left replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(tuple(names)):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if axes and shape is not None and mesh is not None:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % size:
                # Keep as many leading axes as still divide the dimension.
                while axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                    axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of an nnx State (concrete or abstract)."""

    def one(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding") or (None,) * len(x.shape)
            spec = logical_to_mesh_spec(names, x.shape, mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Lay an existing model's parameters out on `mesh` (in place) and return it."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    nnx.update(model, state)
    return model


def create_sharded(factory, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Build `factory()` with its parameters born sharded on `mesh`.

    The shapes come from `nnx.eval_shape`, the layout from the rule table, and the
    initialisation runs under `jax.jit(out_shardings=...)`: no device ever holds the
    whole unsharded model.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(factory())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules=DEFAULT_RULES) -> Iterator[None]:
    """Make `constrain` use this mesh and rule table while tracing inside the block."""
    prev = getattr(_local, "ctx", None)
    _local.ctx = None if mesh is None else (mesh, tuple(rules))
    try:
        yield
    finally:
        _local.ctx = prev


def current_mesh() -> Mesh | None:
    ctx = getattr(_local, "ctx", None)
    return None if ctx is None else ctx[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `activate(mesh)`."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_mesh_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES, batch_size: int | None = None):
    """Sharding of an input batch: the leading axis split as `act_batch`, the rest replicated."""
    names = ("act_batch",) + (None,) * (ndim - 1)
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_mesh_spec(names, shape, mesh, rules))


def cast_floating(tree: Any, dtype: jnp.dtype | None) -> Any:
    """Cast every floating leaf of a pytree to `dtype` (None: unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "param", "make_mesh", "logical_to_mesh_spec",
    "state_shardings", "shard_model", "create_sharded", "activate", "constrain",
    "current_mesh", "batch_sharding", "cast_floating",
]
