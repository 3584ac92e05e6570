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
from typing import Any, Collection, Mapping

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


def read_msgpack(path: str | Path, dtype: Any = None, mapped: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Read a flax msgpack checkpoint into a flat `{"a/b/c": array}` dict.

    The file is parsed from a buffered stream (`_StreamReader`): each tensor's bytes are
    read straight into its final array, through a 16 MiB buffer when it is cast, so the
    transient memory of a load is that buffer, not the file or the largest tensor
    (`benchmarks/load_memory.py`).

    Args:
      path: the `.msgpack` file.
      dtype: if given, every floating tensor is cast to it as it is decoded.
      mapped: flat keys of tensors not to read: each comes back as a read-only
        `np.memmap` of the file, in the dtype it is stored in (not cast), so only the
        pages of it that are used are ever read into memory. For a table read a few rows
        at a time (the text-token embedding: DALL-E Mini's is 206 MB in float32, a
        prompt reads 64 rows of it). The file must then not be rewritten in place while
        the map is used (`write_msgpack` replaces files by renaming, which is safe).

    Raises:
      CheckpointError: the file is missing, damaged, truncated or not a param tree.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    target = None if dtype is None else np.dtype(dtype)
    try:
        with open(path, "rb", buffering=2**20) as f:
            reader = _StreamReader(f, target, path, frozenset(mapped))
            tree = reader.value()
            if f.read(1):
                raise CheckpointError(f"{path} has trailing data after the parameter tree")
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path} {e}") from None
    except Exception as e:  # a damaged file can fail anywhere: say which file
        raise CheckpointError(
            f"{path} is damaged and cannot be decoded as a flax msgpack checkpoint "
            f"({type(e).__name__}: {e})"
        ) from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} does not hold a parameter tree (found {type(tree).__name__})")
    return flatten(_unchunk(tree, target))


_CAST_CHUNK_BYTES = 16 * 2**20  # the reusable buffer a cast tensor is read through


class _StreamReader:
    """A msgpack decoder over a binary stream that reads tensors in place.

    `msgpack.Unpacker` hands an ext payload to its hook as one `bytes` object, which the
    hook unpacks into a second one before numpy can view it: three copies of the largest
    tensor (a 134 MB stacked float32 kernel for DALL-E Mini) alive at once. Here the
    format's few types are decoded by hand (spec: github.com/msgpack/msgpack/blob/master/
    spec.md) and an ndarray ext's raw bytes go straight from the file into the result.
    Errors raise `CheckpointError` without the path (`read_msgpack` adds it).
    """

    def __init__(self, f, target: np.dtype | None, path: Path | None = None,
                 mapped: frozenset[str] = frozenset()):
        self.f, self.target = f, target
        self.size = os.fstat(f.fileno()).st_size
        self.path, self.mapped = path, mapped
        self.keys: list[str] = []  # the map keys down to the value being read

    def need(self, n: int) -> None:
        """Fail before allocating when a (maybe damaged) length runs past the file's end."""
        if self.f.tell() + n > self.size:
            raise CheckpointError("is truncated (the file ends inside the parameter tree): "
                                  "re-download or re-export it")

    def read(self, n: int) -> bytes:
        self.need(n)
        return self.f.read(n)

    def uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "big")

    def value(self) -> Any:
        b = self.read(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self.read(b & 0x1F).decode()
        fixed = _FIXED_HEADS.get(b)
        if fixed is not None:
            kind, width = fixed
            if kind == "map":
                return self.map(self.uint(width))
            if kind == "array":
                return [self.value() for _ in range(self.uint(width))]
            if kind == "str":
                return self.read(self.uint(width)).decode()
            if kind == "bin":
                return self.read(self.uint(width))
            if kind == "ext":  # ext8/16/32: length first, then the type code
                n = self.uint(width)
                return self.ext(int.from_bytes(self.read(1), "big", signed=True), n)
            if kind == "fixext":
                return self.ext(int.from_bytes(self.read(1), "big", signed=True), width)
            if kind == "uint":
                return self.uint(width)
            if kind == "int":
                return int.from_bytes(self.read(width), "big", signed=True)
            return float(np.frombuffer(self.read(width), ">f4" if width == 4 else ">f8")[0])
        if b in _CONSTANTS:
            return _CONSTANTS[b]
        raise CheckpointError(f"is damaged: byte 0x{b:02x} at offset {self.f.tell() - 1} "
                              "starts no msgpack value")

    def map(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value()
            key = key if isinstance(key, str) else str(key)
            self.keys.append(key)
            out[key] = self.value()
            self.keys.pop()
        return out

    def ext(self, code: int, length: int) -> Any:
        if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
            payload = self.read(length)
            if code == _EXT_COMPLEX:
                re, im = msgpack.unpackb(payload)
                return complex(re, im)
            raise CheckpointError(f"has an unknown msgpack extension type {code}")
        begin = self.f.tell()
        # The payload is msgpack of (shape, dtype name, raw bytes): a 3-array whose last
        # element is read here rather than by value(), which would return it as `bytes`.
        if self.read(1)[0] != 0x93:
            raise CheckpointError("is damaged: an array extension does not hold "
                                  "(shape, dtype, bytes)")
        shape, name = self.value(), self.value()
        head = _FIXED_HEADS.get(self.read(1)[0])
        if not isinstance(shape, list) or head is None or head[0] != "bin":
            raise CheckpointError("is damaged: an array extension does not hold "
                                  "(shape, dtype, bytes)")
        nbytes = self.uint(head[1])
        src = _np_dtype(name)
        shape = tuple(int(d) for d in shape)
        count = int(np.prod(shape, dtype=np.int64))
        if count * src.itemsize != nbytes or self.f.tell() - begin + nbytes != length:
            raise CheckpointError(f"is damaged: a tensor of shape {shape} and dtype {src} "
                                  f"does not fit its {nbytes} bytes")
        self.need(nbytes)
        if self.mapped and "/".join(self.keys) in self.mapped:
            offset = self.f.tell()
            self.f.seek(nbytes, os.SEEK_CUR)
            if not count:  # numpy cannot map zero bytes
                return np.empty(shape, src)
            return np.memmap(self.path, dtype=src, mode="r", offset=offset, shape=shape)
        cast = self.target is not None and _is_float(src) and src != self.target
        out = np.empty(count, self.target if cast else src)
        if not cast:
            self.read_into(out.view(np.uint8))
        else:  # through a bounded buffer: never the whole tensor in both dtypes
            step = max(1, _CAST_CHUNK_BYTES // src.itemsize)
            buf = np.empty(min(count, step) * src.itemsize, np.uint8)
            for i in range(0, count, step):
                k = min(step, count - i)
                self.read_into(buf[: k * src.itemsize])
                out[i:i + k] = buf[: k * src.itemsize].view(src)
        return out.reshape(shape)

    def read_into(self, dest: np.ndarray) -> None:
        self.need(dest.nbytes)
        view = memoryview(dest)
        done = 0
        while done < len(view):  # readinto may return less than asked
            n = self.f.readinto(view[done:])
            if not n:
                raise CheckpointError("is truncated: the file shrank while it was read")
            done += n


# msgpack head byte -> (kind, byte width of its length or value); fixmap/fixarray/fixstr,
# the fixints, nil and booleans are decoded in `_StreamReader.value`.
_FIXED_HEADS: dict[int, tuple[str, int]] = {
    0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
    0xCA: ("float", 4), 0xCB: ("float", 8),
    0xCC: ("uint", 1), 0xCD: ("uint", 2), 0xCE: ("uint", 4), 0xCF: ("uint", 8),
    0xD0: ("int", 1), 0xD1: ("int", 2), 0xD2: ("int", 4), 0xD3: ("int", 8),
    0xD4: ("fixext", 1), 0xD5: ("fixext", 2), 0xD6: ("fixext", 4), 0xD7: ("fixext", 8),
    0xD8: ("fixext", 16),
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}


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
