"""Training data: encoded (caption, image codes) examples in memory, batched deterministically.

Every caption is tokenised once, up front. The order of epoch `e` is
`permutation(N)` drawn from `(seed, e)`, so batch `b` of epoch `e` is a pure function of
the seed and the position: a resumed run, or any process of a multi-process run,
computes exactly the same global batch without talking to anyone. Each process then
takes only the rows its own devices hold (`local_rows`) and the global array is
assembled with `jax.make_array_from_process_local_data`.

Shapes: N examples, T text length, S image length, G micro-steps, M micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from .data import read_encoded


@dataclasses.dataclass
class EncodedSet:
    """Tokenised examples.

    Attributes:
      input_ids: [N, T] int32 text tokens.
      attention_mask: [N, T] int32, 1 for real tokens.
      labels: [N, S] int32 image codes.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_encoded(pattern: str, tokenizer, image_len: int, num_codes: int) -> EncodedSet:
    """Read encoded shards (`data.read_encoded`) and tokenise their captions once.

    Args:
      pattern: a parquet file, a folder of them, or a glob.
      tokenizer: a `text.TextTokenizer` (list[str] -> input_ids, attention_mask [B, T]).
      image_len: S, the model's image length; every encoding must have it.
      num_codes: codes must lie in [0, num_codes) (the model's image_vocab_size).
    """
    captions, codes = read_encoded(pattern)
    if codes.ndim != 2 or codes.shape[1] != image_len:
        raise ValueError(
            f"{pattern}: encodings have shape {codes.shape}, but the model has image_len={image_len} "
            "(was the set encoded with a different VQGAN?)"
        )
    if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
        raise ValueError(
            f"{pattern}: codes span [{codes.min()}, {codes.max()}], outside the model's "
            f"{num_codes} image codes"
        )
    tok = tokenizer(captions)
    return EncodedSet(
        input_ids=np.asarray(tok["input_ids"], np.int32),
        attention_mask=np.asarray(tok["attention_mask"], np.int32),
        labels=codes,
    )


def unconditional_tokens(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """([T], [T]) ids and mask of the unconditional prompt "" used for blank captions."""
    tok = tokenizer.unconditional(1)
    return np.asarray(tok["input_ids"], np.int32)[0], np.asarray(tok["attention_mask"], np.int32)[0]


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """[start, stop) of the rows along `axis` that this process's devices hold.

    The batch axis is split over ('data', 'fsdp'); with the mesh built from
    `jax.devices()` (process-major) each process's rows are one contiguous block.
    """
    idx = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [s[axis].start or 0 for s in idx]
    stops = [global_shape[axis] if s[axis].stop is None else s[axis].stop for s in idx]
    lo, hi = min(starts), max(stops)
    held = sorted(set(zip(starts, stops)))
    covered = sum(b - a for a, b in held)
    if covered != hi - lo:
        raise ValueError(
            f"this process's batch rows {held} are not one contiguous block: build the mesh from "
            "jax.devices() in their default (process-major) order"
        )
    return lo, hi


@dataclasses.dataclass
class DataPosition:
    """Where the iterator stands: batch `index` of epoch `epoch` is the next one."""

    epoch: int = 0
    index: int = 0


class BatchIterator:
    """Deterministic global batches, each process materialising only its own rows.

    Batches are dicts of [G, M, ...] arrays (G micro-steps of M examples each, M global):
    `input_ids`, `attention_mask` [G, M, T] and `labels` [G, M, S], sharded on M.
    """

    def __init__(self, data: EncodedSet, batch_size: int, grad_accum: int, seed: int,
                 sharding: NamedSharding, position: DataPosition | None = None):
        if len(data) < batch_size:
            raise ValueError(f"{len(data)} training examples is fewer than one batch of {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.sharding = sharding
        self.position = position or DataPosition()
        self.batches_per_epoch = len(data) // batch_size  # the remainder is dropped, reshuffled next epoch
        self._perm_epoch, self._perm = -1, None
        M = batch_size // grad_accum
        self._rows = local_rows(sharding, (grad_accum, M), axis=1)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, position: DataPosition) -> np.ndarray:
        """[G, M] example indices of the batch at `position` (the same on every process)."""
        perm = self._permutation(position.epoch)
        b = position.index
        idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
        return idx.reshape(self.grad_accum, -1)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        idx = self.global_indices(self.position)
        lo, hi = self._rows
        local = idx[:, lo:hi]
        batch = {
            "input_ids": self.data.input_ids[local],
            "attention_mask": self.data.attention_mask[local],
            "labels": self.data.labels[local],
        }
        index = self.position.index + 1
        self.position = (DataPosition(self.position.epoch + 1, 0) if index >= self.batches_per_epoch
                         else DataPosition(self.position.epoch, index))
        return to_global(batch, self.sharding, idx.shape)


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding, lead: tuple[int, ...]) -> dict[str, jax.Array]:
    """Per-process rows -> global arrays with leading shape `lead` (e.g. [G, M])."""
    out = {}
    for k, v in local.items():
        global_shape = tuple(lead) + v.shape[len(lead):]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def eval_batches(data: EncodedSet, batch_size: int, sharding: NamedSharding,
                 max_batches: int = 0) -> Iterator[dict[str, Any]]:
    """The validation set in order, in [1, M, ...] batches, the last one padded.

    Padded rows repeat real examples with `weight` 0, so every example counts exactly once.
    """
    n = len(data)
    num = -(-n // batch_size)
    if max_batches:
        num = min(num, max_batches)
    lo, hi = local_rows(sharding, (1, batch_size), axis=1)
    for b in range(num):
        idx = np.arange(b * batch_size, (b + 1) * batch_size)
        weight = (idx < n).astype(np.float32)
        idx = (idx % n)[None, lo:hi]
        local = {
            "input_ids": data.input_ids[idx],
            "attention_mask": data.attention_mask[idx],
            "labels": data.labels[idx],
            "weight": weight[None, lo:hi],
        }
        yield to_global(local, sharding, (1, batch_size))
