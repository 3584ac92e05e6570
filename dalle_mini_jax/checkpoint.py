"""Model-directory I/O: the released `flax_model.msgpack` format, read and written safely.

A released checkpoint is `flax.serialization.to_bytes(params)`: a msgpack map of nested
string keys whose leaves are numpy arrays packed as msgpack ext type 1
(`(shape, dtype name, raw bytes)`), with arrays over ~1 GiB split into
`__msgpack_chunked_array__` maps. We read it with our own streaming reader so that

  * nothing but plain data is decoded (no pickle, no code execution);
  * each tensor is cast to the requested dtype as soon as it is decoded, so loading
    bf16 weights from an fp32 file never holds a full fp32 copy of the model;
  * a damaged or truncated file gives a `CheckpointError` naming the file.

Parameter trees are handled flat, as `{"a/b/c": array}`; `check_tree` compares a
found tree with the expected one and names every missing, unexpected or misshapen
tensor with both shapes. The model-specific name mapping (released tree <-> our
modules) lives with each model (`transformer.py`, `vqgan.py`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import msgpack
import numpy as np

MSGPACK_NAME = "flax_model.msgpack"
CONFIG_NAME = "config.json"

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
_MAX_CHUNK_BYTES = 2**30  # flax's MAX_CHUNK_SIZE: arrays above this are chunked


class CheckpointError(ValueError):
    """A model directory or checkpoint file cannot be loaded as it is."""


def _np_dtype(name: str | bytes) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode()
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating) or dt in (ml_dtypes.bfloat16, np.float16)


def read_msgpack(path: str | Path, dtype: Any = None) -> dict[str, np.ndarray]:
    """Read a flax msgpack checkpoint into a flat `{"a/b/c": array}` dict.

    Args:
      path: the `.msgpack` file.
      dtype: if given, every floating tensor is cast to it as it is decoded.

    Raises:
      CheckpointError: the file is missing, damaged, truncated or not a param tree.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    target = None if dtype is None else np.dtype(dtype)

    def ext_hook(code: int, data: bytes):
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
            arr = np.frombuffer(buf, dtype=_np_dtype(dtype_name)).reshape(shape)
            if target is not None and _is_float(arr.dtype):
                return arr.astype(target)
            return arr.copy()  # own the memory: `buf` belongs to the msgpack buffer
        if code == _EXT_COMPLEX:
            re, im = msgpack.unpackb(data)
            return complex(re, im)
        raise CheckpointError(f"{path}: unknown msgpack extension type {code}")

    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(
                f, ext_hook=ext_hook, raw=False, strict_map_key=False,
                max_buffer_size=2**31 - 1, max_ext_len=2**31 - 1, max_bin_len=2**31 - 1,
            )
            tree = unpacker.unpack()
            try:
                unpacker.unpack()
            except msgpack.OutOfData:
                pass
            else:
                raise CheckpointError(f"{path} has trailing data after the parameter tree")
    except CheckpointError:
        raise
    except msgpack.OutOfData:
        raise CheckpointError(
            f"{path} is truncated (the file ends inside the parameter tree): re-download or "
            "re-export it"
        ) from None
    except Exception as e:  # msgpack raises many types on corrupt input
        raise CheckpointError(
            f"{path} is damaged and cannot be decoded as a flax msgpack checkpoint "
            f"({type(e).__name__}: {e})"
        ) from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} does not hold a parameter tree (found {type(tree).__name__})")
    return flatten(_unchunk(tree, target))


def _unchunk(tree: Any, target: np.dtype | None) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v, target) for k, v in tree.items()}
    return tree


def write_msgpack(path: str | Path, flat: Mapping[str, Any]) -> None:
    """Write a flat `{"a/b/c": array}` dict as a released-format flax msgpack file.

    The file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written checkpoint under the real name.
    """
    tree = unflatten({k: np.asarray(v) for k, v in flat.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            packer = msgpack.Packer(default=_pack_default, use_bin_type=True)
            f.write(packer.pack(_chunk(tree)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pack_default(x: Any):
    if isinstance(x, (np.ndarray, np.generic)):
        arr = np.ascontiguousarray(x)
        payload = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(_EXT_NDARRAY if isinstance(x, np.ndarray) else _EXT_NPSCALAR, payload)
    raise TypeError(f"cannot serialise {type(x).__name__} into a checkpoint")


def _chunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _chunk(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.nbytes > _MAX_CHUNK_BYTES:
        per = max(1, _MAX_CHUNK_BYTES // tree.dtype.itemsize)
        flat = tree.reshape(-1)
        chunks = [flat[i : i + per] for i in range(0, flat.size, per)]
        return {
            _CHUNKED: True,
            "shape": {str(i): s for i, s in enumerate(tree.shape)},
            "chunks": {str(i): c for i, c in enumerate(chunks)},
        }
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> `{"a/b/c": leaf}`."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a/b/c": leaf}` -> nested dict."""
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def check_tree(
    found: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise a `CheckpointError` naming every missing, unexpected or misshapen tensor.

    Args:
      found: flat tree as read (leaves with `.shape`).
      expected: flat tree of expected shapes.
      source: what the tree came from (a file path), for the message.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(
        k for k in set(found) & set(expected) if tuple(np.shape(found[k])) != tuple(expected[k])
    )
    if not (missing or unexpected or misshapen):
        return
    lines = [f"{source} does not match the model its config.json describes:"]
    lines += [f"  missing tensor {k} (expected shape {tuple(expected[k])})" for k in missing]
    lines += [f"  unexpected tensor {k} (shape {tuple(np.shape(found[k]))})" for k in unexpected]
    lines += [
        f"  misshapen tensor {k}: expected shape {tuple(expected[k])}, found {tuple(np.shape(found[k]))}"
        for k in misshapen
    ]
    lines.append("Check that config.json belongs to these weights, or re-export the directory.")
    raise CheckpointError("\n".join(lines))


def model_dir(path: str | Path, what: str) -> Path:
    """Validate that `path` is a model directory with a config.json and weights."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"{what} directory {path} does not exist (expected a folder with {CONFIG_NAME} and "
            f"{MSGPACK_NAME})"
        )
    for name in (CONFIG_NAME, MSGPACK_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"{what} directory {path} has no {name}")
    return path
