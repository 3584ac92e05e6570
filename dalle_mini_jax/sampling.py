"""Sampling image tokens: guidance, temperature / top-k / top-p, and the jitted decode loop.

Everything numeric here is a pure function of arrays; `TokenSampler` only holds the
compiled versions for one model.

Per step, in the order of the original dalle-mini (reference §4.1):

  1. guidance (super-conditioning) on the raw logits:
       logits = uncond + guidance * (cond - uncond)
     The conditional and unconditional rows go through the decoder as ONE batch
     (rows [0, B) conditional, [B, 2B) unconditional) and share one KV cache.
  2. only real image codes are kept: ids >= `num_codes` (BOS, and Mega's padding
     ids) are sliced off, so they can never be sampled whatever their logits.
  3. temperature, 4. top-k, 5. top-p, 6. a categorical draw (Gumbel-argmax; with
     top-k alone, the noise is made for the k kept codes only, same codes:
     `_draw_top_k`).

Randomness. Every image has its own key, and the token at image position i is drawn
with `fold_in(image_key, i)`. Rows never share a key and no key is split across the
batch, so an image does not depend on which other images are in the batch, on the
batch size or on the device count (up to float rounding of differently shaped
matmuls, which in practice never flips a draw). `image_keys` derives the image key
from (seed, prompt text, index of the image for that prompt) — see its docstring.

The loop. `TokenSampler.start` encodes the prompts once, computes the
cross-attention keys/values once per distinct prompt (they are then gathered to the
batch rows) and preallocates the self-attention cache as L buffers [rows, H, S, K].
The decoder weights a step reads are passed as separate per-layer buffers too
(`split_decoder_layers`): XLA:CPU copies a slice of a stacked weight or cache before
using it, which would triple the memory traffic of a bandwidth-bound step. Each
dense kernel is held [out, in] (`OutMajor`). On a CPU, for a model big enough to gain
(`dot_layout`), the step's dots and attention run in `cpu_dots`, a small C++ kernel
built on first use that splits each over all cores and reads only the cache
positions written so far; otherwise each kernel is cut in one part per core
(`kernel_parts`), the layout and the concurrency XLA:CPU multiplies a few rows
fastest with. With float32 `cpu_dots` kernels the start also folds the
cross-attention's q and o kernels with the prompts' keys/values when that reads less
(`fold_cross_attention`, `TokenSampler.fold_plan`).
`TokenSampler.run(state, start, stop)` runs decode steps start..stop-1 as one
`lax.fori_loop` inside one jitted call, with the state donated so the cache is
updated in place. Step bounds are traced values, so a full 256-step run and a run in
chunks of k steps (progress bars, progressive previews) use the same compiled code
and give identical tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import numbers
import itertools
import weakref
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import cpu_dots
from .cpu_dots import cpu_cores
from .host_memory import compile_then_trim
from .sharding import activate, constrain
from .transformer import (CACHE_AXES, DalleBart, DecodeCache, OutMajor, TableBits, _one_job, fold_cross_attention,
                          host_rows)

# Defaults of the original dalle-mini inference notebook, which the released models were
# shown with: condition scale 10, and top-k 50 (its `top_k=None` falls back to the HF
# PretrainedConfig default of 50, reference §4.1). min-dalle uses 16 and 256.
DEFAULT_GUIDANCE = 10.0
DEFAULT_TOP_K = 50


class ModelDefault(enum.Enum):
    """The type of `MODEL_DEFAULT` (for annotations)."""

    MODEL_DEFAULT = "the model's default"

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


# "Not given: use the model's default" (`DalleMini.defaults`, read from the model
# directory's generation_config.json). A sentinel rather than None, because None is a
# setting of its own: no top-k / no top-p / no guidance. An enum member, so it stays the
# one object through copy and pickle.
MODEL_DEFAULT = ModelDefault.MODEL_DEFAULT

# How many times each jitted function has been traced (tests check for recompiles).
TRACE_COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn. The field defaults are the released DALL·E Mini's.

    Attributes:
      temperature: > 0; logits are divided by it (after guidance).
      top_k: keep the k most likely codes (exactly k; ties at the boundary go to the
        lower id), or None for all. Clipped to the number of codes.
      top_p: nucleus sampling: keep the smallest set of most likely codes whose
        probability sums to >= top_p (codes tied with the last one kept are kept too),
        in (0, 1]; None or 1 = off.
      guidance: super-conditioning scale; None or 1 = no unconditional rows at all.
    """

    temperature: float = 1.0
    top_k: int | None = DEFAULT_TOP_K
    top_p: float | None = None
    guidance: float | None = DEFAULT_GUIDANCE

    def __post_init__(self):
        # numbers.Real: numpy scalars are fine too (a sweep over np.linspace, say).
        if not (isinstance(self.temperature, numbers.Real) and self.temperature > 0
                and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.guidance is not None and not np.isfinite(self.guidance):
            raise ValueError(f"guidance must be a finite number or None, got {self.guidance!r}")

    @property
    def guided(self) -> bool:
        """Whether unconditional rows are needed (guidance other than None / 1)."""
        return self.guidance is not None and float(self.guidance) != 1.0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p is not None and float(self.top_p) < 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, **values: Any) -> "SamplingSettings":
        """These settings with the fields in `values` replaced (validated again).

        A value of `MODEL_DEFAULT` keeps this object's value, so a caller can pass its
        arguments straight through; None is a value (off), not "keep".
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not MODEL_DEFAULT})


# --------------------------------------------------------------------------------------
# Pure per-step maths
# --------------------------------------------------------------------------------------


def apply_guidance(logits: jax.Array, guidance: jax.Array) -> jax.Array:
    """Super-conditioning: [2B, V] (cond rows, then uncond rows) -> [B, V].

    logits = uncond + guidance * (cond - uncond), on raw logits, as the original.
    """
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + guidance * (cond - uncond)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keep exactly the k largest logits per row, -inf elsewhere.

    Args:
      logits: [B, V] float.
      k: static; clipped to V.

    Returns:
      [B, V]; ties at the k-th value are broken toward the lower id (`lax.top_k`).
    """
    k = min(int(k), logits.shape[-1])
    if k >= logits.shape[-1]:
        return logits
    _, idx = jax.lax.top_k(logits, k)
    keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], idx].set(True)
    return jnp.where(keep, logits, -jnp.inf)


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filter: keep the smallest most-likely set with probability >= top_p.

    A code is kept when the probability of the codes strictly more likely than it
    (in sorted order) is < top_p, so the most likely code is always kept; codes
    tied with the last kept one are kept too.

    Args:
      logits: [B, V] float (may hold -inf from top-k).
      top_p: scalar in (0, 1].

    Returns:
      [B, V] with dropped logits set to -inf.
    """
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the codes ranked above
    kept = before < top_p
    # The smallest kept logit is the threshold (kept is a prefix of the sorted row).
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def warp_logits(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: int | None,
    top_p: jax.Array | None,
) -> jax.Array:
    """Temperature, then top-k, then top-p (the original's order). [B, V] -> [B, V] f32."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None:
        logits = top_p_mask(logits, top_p)
    return logits


def sample_codes(
    keys: jax.Array,
    logits: jax.Array,
    position: jax.Array,
    num_codes: int,
    temperature: jax.Array,
    top_k: int | None,
    top_p: jax.Array | None,
) -> jax.Array:
    """Draw one image code per row.

    Args:
      keys: [B] typed PRNG keys, one per image.
      logits: [B, V] guided logits (V may include BOS / padding ids).
      position: scalar, index of the image token being drawn; row b uses
        `fold_in(keys[b], position)`.
      num_codes: static; only ids < num_codes can be drawn.
      temperature, top_k, top_p: see `SamplingSettings`.

    Returns:
      [B] int32 codes in [0, num_codes).
    """
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, position)
    logits = logits[:, :num_codes]
    if top_k is not None and top_k < num_codes and top_p is None and _draws_kept_only(step_keys):
        return _draw_top_k(step_keys, logits.astype(jnp.float32) / temperature, top_k)
    logits = warp_logits(logits, temperature, top_k, top_p)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


# The draw among the top k. `jax.random.categorical(key, logits)` is
# argmax(logits + gumbel(key, [V])): with top-k, every code but k has logit -inf and can
# never win, yet the full draw makes V random numbers, adds and scans V (~1.1 ms of a
# DALL-E Mini step on a 2-core CPU, 16,384 codes, for 50 kept). `_draw_top_k` makes the
# Gumbel noise of the kept ids only, giving the same codes bit for bit. It relies on how
# jax's threefry makes bits with `jax_threefry_partitionable` (on by default): the bits
# of element i of a [V] draw are threefry2x32(key, (0, i)), xor'ed, then turned into a
# float as `jax.random.uniform` does. The tests check that against
# `jax.random.gumbel` / `categorical` on the installed JAX; under the flags that change
# how JAX makes the bits, the full draw runs. (A JAX that made them some other way would
# still get a correct draw here, the same for a seed whatever the batch, only not
# `categorical`'s own. Checking that at run time cost ~50 MB of compiler memory.)
def _gumbel_at(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """gumbel(keys[b], [V])[ids[b]] for V > every id, made for those ids only.

    Args:
      keys: [B] typed threefry keys.
      ids: [B, k] int32 ids, >= 0.

    Returns:
      [B, k] float32, `jax.random.gumbel`'s default ("low") mode.
    """
    data = jax.random.key_data(keys)  # [B, 2] uint32
    lo = ids.astype(jnp.uint32)
    k1, k2 = (jnp.broadcast_to(data[:, i:i + 1], lo.shape) for i in (0, 1))
    b1, b2 = _threefry_primitive().bind(k1, k2, jnp.zeros_like(lo), lo)
    # jax.random.uniform(minval=tiny, maxval=1): 23 random mantissa bits in [1, 2), - 1.
    one = np.array(1.0, np.float32)
    mantissa = ((b1 ^ b2) >> np.uint32(32 - 23)) | one.view(np.uint32)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - one
    lo_val, hi_val = jnp.float32(np.finfo(np.float32).tiny), jnp.float32(1.0)
    u = jax.lax.max(lo_val, floats * (hi_val - lo_val) + lo_val)
    return -jnp.log(-jnp.log(u))


def _draw_top_k(keys: jax.Array, logits: jax.Array, k: int) -> jax.Array:
    """`categorical(keys[b], top_k_mask(logits, k)[b])` per row, drawing among the k only.

    Args:
      keys: [B] typed keys (the step's); logits: [B, V] float32 (temperature applied);
      k: static, < V.

    Returns:
      [B] int32 codes.
    """
    _, ids = jax.lax.top_k(logits, k)  # the ids `top_k_mask` keeps
    # Ascending ids, so argmax breaks ties toward the lower id as the full draw's does.
    ids = jnp.sort(ids, axis=-1)
    noisy = jnp.take_along_axis(logits, ids, axis=-1) + _gumbel_at(keys, ids)
    return jnp.take_along_axis(ids, jnp.argmax(noisy, axis=-1)[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _draws_kept_only(keys: jax.Array) -> bool:
    """Whether `_draw_top_k` gives `jax.random.categorical`'s codes for these keys."""
    flag = lambda name, default: getattr(jax.config, name, default)  # noqa: E731 (flags come and go)
    return (str(jax.random.key_impl(keys)) == "threefry2x32" and flag("jax_threefry_partitionable", False)
            and not flag("jax_high_dynamic_range_gumbel", True) and _threefry_primitive() is not None)


@functools.cache
def _threefry_primitive():
    """jax.extend's threefry2x32 primitive (None on a JAX without it)."""
    try:
        from jax.extend.random import threefry2x32_p
    except ImportError:
        return None
    return threefry2x32_p


def image_keys(seed: int, prompts: Sequence[str], indices: Sequence[int]) -> jax.Array:
    """One PRNG key per image: fold_in(fold_in(key(seed), crc32(prompt)), index).

    Image `index` of `prompt` under `seed` is therefore the same image whatever else is
    in the call (other prompts, num_images, batch size, devices). The prompt text is
    folded in so that two different prompts in one call do not share their noise
    (which would correlate their compositions); the same prompt twice gives the same
    images.

    Args:
      seed: any int (taken modulo 2**32... via jax.random.key).
      prompts: [N] the prompt of each image, as given by the user.
      indices: [N] the index of each image among its prompt's images.

    Returns:
      [N] typed keys.
    """
    base = jax.random.key(int(seed) % 2**32)
    hashes = np.asarray([zlib.crc32(p.encode("utf-8")) for p in prompts], np.uint32)
    idx = np.asarray(indices, np.uint32)
    if len(hashes) != len(idx):
        raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices")
    fold = jax.vmap(lambda h, i: jax.random.fold_in(jax.random.fold_in(base, h), i))
    return fold(jnp.asarray(hashes), jnp.asarray(idx))


# --------------------------------------------------------------------------------------
# The decode state and the jitted loop
# --------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries between steps (and between chunks of steps).

    Attributes:
      cache: the decoder KV cache over all rows (cond rows, then uncond rows if guided).
      tokens: [B, S] int32 image codes drawn so far (entries >= the next position are 0).
      last: [B] int32 the token fed at the next position (BOS before position 0).
    """

    cache: DecodeCache
    tokens: jax.Array
    last: jax.Array


def start_state(
    model: DalleBart,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rows: jax.Array,
    uncond_row: jax.Array | None,
    enc_layers: list[Any] | None = None,
    token_rows: jax.Array | None = None,
    fold: tuple | None = None,
) -> DecodeState:
    """Encode the distinct prompts once and build the decode state for the image rows.

    Args:
      model: the DalleBart.
      input_ids, attention_mask: [P, T] the distinct prompts (plus, if guided, the
        unconditional prompt as one more row).
      rows: [B] int, which of the P text rows each image uses.
      uncond_row: scalar int index of the unconditional text row, or None (unguided).
      enc_layers: the encoder layers as separate buffers (`split_encoder_layers`), or
        None for the model's stacked ones.
      token_rows: [P, T, D] float32 token-table rows of `input_ids`, for a model whose
        table is on the host (`DalleBart.encode`), else None.
      fold: None, or (cols [U, 2] int32, col_valid [U] bool, kernels): fold the
        cross-attention with the encoder's keys/values (`fold_cross_attention`) over the
        U text positions cols[u] = (text row, position), those with col_valid, where
        kernels are the L layers' (q, o) cross-attention kernels ([H*K, D], [D, H*K]).

    Returns:
      DecodeState with 2B rows (guided) or B rows.
    """
    cfg = model.config
    enc = model.encode(input_ids, attention_mask, layers=enc_layers, token_rows=token_rows)
    # Cross K/V once per distinct prompt, gathered to the rows afterwards: a 3x3 grid of
    # one prompt computes them for 2 text rows, not 18.
    small = model.init_cache(enc, attention_mask)
    B = rows.shape[0]
    sel = rows if uncond_row is None else jnp.concatenate([rows, jnp.full((B,), uncond_row, rows.dtype)])
    L, R, S, H, K = cfg.num_decoder_layers, sel.shape[0], cfg.image_len, cfg.num_heads, cfg.head_dim
    # Every cache as L separate buffers: XLA:CPU updates those in place, while a
    # stacked [L, ...] cache gets copied every step (see DalleBart.decode_step), and
    # reading layer l of a stacked cross cache copies that slice every step.
    names = CACHE_AXES[1:]
    zeros = lambda: constrain(jnp.zeros((R, H, S, K), small.self_k.dtype), names)  # noqa: E731
    if fold is not None:
        cols, col_valid, kernels = fold
        # [U, L, H, K]: the U positions' keys/values (advanced indices lead).
        ks, vs = (c[:, cols[:, 0], :, cols[:, 1]] for c in (small.cross_k, small.cross_v))
        qk, vo = zip(*(fold_cross_attention(q, o, ks[:, l], vs[:, l]) for l, (q, o) in enumerate(kernels)))
        cross = dict(cross_k=None, cross_v=None, cross_qk=list(qk), cross_vo=list(vo),
                     cross_valid=col_valid[None, :] & (cols[None, :, 0] == sel[:, None]))
    else:
        cross = dict(cross_k=[constrain(small.cross_k[l, sel], names) for l in range(L)],
                     cross_v=[constrain(small.cross_v[l, sel], names) for l in range(L)])
    cache = DecodeCache(self_k=[zeros() for _ in range(L)], self_v=[zeros() for _ in range(L)],
                        enc_mask=small.enc_mask[sel], **cross)
    return DecodeState(
        cache=cache,
        tokens=jnp.zeros((B, S), jnp.int32),
        last=jnp.full((B,), cfg.bos_token_id, jnp.int32),
    )


# Decoder token tables left on the host (`HostTable`), by key. A registry rather than a
# closure, so the decode loop's compiled program stays shared between samplers.
_HOST_TABLES: dict[int, tuple[np.ndarray, Any]] = {}
_HOST_TABLE_KEYS = itertools.count()


def _host_table_rows(key: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Runs on the host inside the decode loop (`jax.pure_callback`): [B] ids -> [B, D]."""
    table, dtype = _HOST_TABLES[int(key)]
    return host_rows(table, ids, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HostTable:
    """The decoder's token table left on the host, read a row per image each step.

    Why: a decode step reads B rows of the [V, D] table; held on the device it is
    resident all the time (DALL-E Mini: 67 MB in float32, 34 MB in bf16), while a
    memory map of the checkpoint (`DalleBart.from_pretrained_tables_on_host`) keeps
    resident only the pages read. The rows are read by a host callback in the loop,
    which on a CPU costs a function call; on an accelerator it would stall every step,
    so pipelines use it on a CPU only (`DalleMini.from_pretrained`).

    With `native` the rows are read by compiled code (`cpu_dots.table_rows`), not a
    Python callback: ~1.2 ms a step less for DALL-E Mini (the callback's cost in
    `benchmarks/decode_profile.py`). The sampler asks for it with its `cpu_dots`
    layout (`dot_layout`), so the small models that stay on XLA's dots never build
    the kernel.

    Attributes:
      key: int32 scalar naming the table in the registry (`register`).
      dim: D (static).
      native: read by `cpu_dots.table_rows` (static).
    """

    key: jax.Array
    dim: int = dataclasses.field(metadata=dict(static=True))
    native: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def register(cls, owner: Any, table: np.ndarray, dtype, native: bool = False) -> "HostTable":
        """Register `table` (rows rounded to `dtype`, as `host_rows`) for as long as
        `owner` lives; with `native`, for `cpu_dots.table_rows` too where it can read
        it (else the callback reads it)."""
        key = next(_HOST_TABLE_KEYS) % 2**31  # an int32 operand
        _HOST_TABLES[key] = (table, dtype)
        native = native and cpu_dots.register_table(key, table, dtype)
        weakref.finalize(owner, _forget_host_table, key)
        return cls(jnp.int32(key), int(table.shape[1]), native)

    def rows(self, ids: jax.Array) -> jax.Array:
        """[B] int token ids -> [B, D] float32 rows (read on the host)."""
        if self.native:
            return cpu_dots.table_rows(self.key, ids, self.dim)
        out = jax.ShapeDtypeStruct((ids.shape[0], self.dim), jnp.float32)
        return jax.pure_callback(_host_table_rows, out, self.key, ids)


def _forget_host_table(key: int) -> None:
    cpu_dots.unregister_table(key)  # first: compiled code must not read a table dropped below
    _HOST_TABLES.pop(key, None)


def step_logits(model: DalleBart, layers: list[Any] | None, head: OutMajor | None,
                token_table: TableBits | HostTable | None, last: jax.Array, position: jax.Array,
                cache: DecodeCache, guided: bool) -> tuple[jax.Array, DecodeCache]:
    """One decoder step wherever the token table lives (see `decode_steps` for the args).

    Args:
      last: [B] int token ids fed at `position` (each image's previous token).
      guided: feed every row twice (conditional rows, then unconditional ones).

    Returns:
      ([2B or B, V] logits, the updated cache).
    """
    fed = jnp.concatenate([last, last]) if guided else last
    if isinstance(token_table, HostTable):
        rows = token_table.rows(last)
        rows = jnp.concatenate([rows, rows]) if guided else rows
        return model.decode_step(fed, position, cache, layers, head, token_rows=rows)
    return model.decode_step(fed, position, cache, layers, head, token_table)


def decode_steps(
    model: DalleBart,
    layers: list[Any] | None,
    head: OutMajor | None,
    token_table: TableBits | HostTable | None,
    state: DecodeState,
    keys: jax.Array,
    begin: jax.Array,
    end: jax.Array,
    temperature: jax.Array,
    guidance: jax.Array | None,
    top_k: int | None,
    top_p: jax.Array | None,
) -> DecodeState:
    """Run decode steps begin..end-1 in one `lax.fori_loop`.

    Step i feeds the token at decoder position i (BOS at 0) and draws image token i.

    Args:
      model: the DalleBart.
      layers: its decoder layers as separate per-layer buffers (`split_decoder_layers`),
        or None to slice the stacked weights (XLA:CPU then copies each slice).
      head: lm_head as an `OutMajor` (`split_head`), or None for the model's.
      token_table: the decoder's token table as bits (`split_token_table`), on the
        host (`HostTable`), or None for the model's.
      state: from `start_state` or a previous call.
      keys: [B] typed image keys.
      begin, end: int32 scalars (traced: every chunk size shares one compilation).
      temperature, guidance, top_p: float32 scalars (guidance None = unguided rows;
        top_p None = no nucleus filter).
      top_k: static int or None.

    Returns:
      the advanced DecodeState.
    """
    num_codes = model.config.num_image_codes
    guided = guidance is not None

    def body(i, st: DecodeState) -> DecodeState:
        logits, cache = step_logits(model, layers, head, token_table, st.last, i, st.cache, guided)
        if guided:
            logits = apply_guidance(logits, guidance)
        codes = sample_codes(keys, logits, i, num_codes, temperature, top_k, top_p)
        tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, codes[:, None], i, axis=1)
        return DecodeState(cache=cache, tokens=tokens, last=codes)

    return jax.lax.fori_loop(begin, end, body, state)


# Decoder-layer weights a decode step never reads: the cross-attention keys/values of the
# prompt are computed once by `init_cache`.
_NOT_PER_STEP = ("cross_attn/k", "cross_attn/v")


@functools.partial(jax.jit, static_argnums=1)
def _unstack(x: jax.Array, parts: int = 0) -> tuple:
    """[L, ...] -> L arrays [...] (new buffers). With parts > 0, x is [L, in, out] and
    each layer comes as `parts` arrays [out_i, in] (`OutMajor.parts`)."""
    if not parts:
        return tuple(x[l] for l in range(x.shape[0]))
    e = [x.shape[2] * i // parts for i in range(parts + 1)]
    return tuple(tuple(x[l, :, e[i]:e[i + 1]].T for i in range(parts)) for l in range(x.shape[0]))


# Below this many bytes of decoder weights read per step, the sampler keeps XLA's dots:
# building `cpu_dots` on first use takes seconds, more than it saves a small model (the
# bundled one reads 4.6 MB of decoder weights a step; DALL-E Mini 772 MB).
CPU_DOTS_MIN_BYTES = 64 * 2**20


def dot_layout(mesh=None, dtype=jnp.float32, step_bytes: int = 0,
               cpu_kernels: bool | None = None) -> tuple[int, bool]:
    """How the sampler holds each decoder kernel: (`OutMajor` parts, threaded).

    Threaded (one part each, multiplied by `cpu_dots.rows_dot` on all cores, and
    attention by `cpu_dots.attend`) on a CPU without a mesh, for float32 or bfloat16
    weights, when `cpu_dots` builds and `cpu_kernels` is True, or None with at least
    `CPU_DOTS_MIN_BYTES` of weights read per step (`step_bytes`). Otherwise
    `kernel_parts(mesh)` parts for XLA's dots.
    """
    wanted = step_bytes >= CPU_DOTS_MIN_BYTES if cpu_kernels is None else cpu_kernels
    if (wanted and mesh is None and jax.default_backend() == "cpu" and cpu_dots.supports(dtype)
            and cpu_dots.available()):
        return 1, True
    return kernel_parts(mesh), False


def kernel_parts(mesh=None) -> int:
    """How many parts the sampler cuts each decoder kernel in (`OutMajor`).

    On a CPU without a mesh, one per core the process may use (XLA:CPU runs each
    small dot on one thread, independent dots at once; measured on 2 cores only, so
    capped at 8); otherwise 1 (a mesh already spreads each dot over its devices).
    """
    if mesh is not None or jax.default_backend() != "cpu":
        return 1
    return max(1, min(cpu_cores(), 8))


def split_layers(stack: nnx.Module, num_layers: int, skip: tuple[str, ...] = (),
                 release_stacked: bool = False, out_major_parts: int = 0, threaded: bool = False) -> list[dict]:
    """A stack of layers' weights as L separate pytrees of separate buffers.

    Args:
      stack: a `Layers` module whose params are stacked [L, ...] (and may be sharded;
        each per-layer array keeps the sharding of its stack minus the layer axis).
      num_layers: L.
      skip: param paths ("cross_attn/k") left out.
      release_stacked: free each stacked array once it is split (so the weights are
        held once), replacing it in the module by an empty placeholder.
      out_major_parts: if > 0, hold each dense kernel ([L, in, out]) as an `OutMajor`
        of that many [out_i, in] buffers, the layout a decode step multiplies fastest.
      threaded: the `OutMajor`s are multiplied by `cpu_dots.rows_dot` (`dot_layout`).

    Returns:
      [L] nested dicts like `_values(stack)` without the layer axis and without `skip`.
    """
    per_layer: list[dict] = [{} for _ in range(num_layers)]
    for path, var in nnx.iter_graph(stack):
        if not isinstance(var, nnx.Param):
            continue
        key = "/".join(str(k) for k in path)
        if key in skip:
            continue
        x = var[...]
        cut = out_major_parts if x.ndim == 3 else 0
        parts = _unstack(x, cut)  # each part keeps the stack's sharding minus the layer axis
        if cut:
            parts = tuple(OutMajor(p, threaded) for p in parts)
        for l in range(num_layers):
            node = per_layer[l]
            *parents, leaf = key.split("/")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = parts[l]
        if release_stacked:
            _release(var, parts)
    return per_layer


def _release(var: nnx.Param, copies: Any) -> None:
    """Free a parameter whose values now live in `copies`, leaving an empty placeholder.

    Waits for the copies first: dispatch is asynchronous, and without the wait every
    freed array would stay alive until the end (peak + 1 decoder).
    """
    x = var[...]
    jax.block_until_ready(copies)
    var.set_value(jnp.zeros((0,), x.dtype))
    x.delete()


def split_decoder_layers(model: DalleBart, release_stacked: bool = False, parts: int = 1,
                         threaded: bool = False) -> list[dict]:
    """The decoder layers' per-step weights as L separate pytrees of separate buffers.

    Args:
      model: a DalleBart.
      release_stacked: free the stacked weights once split (`split_layers`). The model
        can then still `encode`, `init_cache` and `decode_step(..., layers=...)`, but not
        run its full-sequence `decode`: only for a model owned by a pipeline.
      parts: each dense kernel is held as an `OutMajor` of this many parts
        (`kernel_parts`); 0 keeps them [in, out] arrays.
      threaded: multiply them with `cpu_dots.rows_dot` (`dot_layout`).

    Returns:
      [L] nested dicts like `_values(model.dec_layers)` without the layer axis and
      without the cross-attention k/v kernels.
    """
    return split_layers(model.dec_layers, model.config.num_decoder_layers, _NOT_PER_STEP,
                        release_stacked, out_major_parts=parts, threaded=threaded)


def split_head(model: DalleBart, parts: int, threaded: bool = False) -> OutMajor:
    """lm_head [D, V] as an `OutMajor` of `parts` parts (`threaded`: see `dot_layout`),
    taken over from the model: its own becomes an empty placeholder (the model then
    needs `decode_step(head=...)`)."""
    head = OutMajor(_unstack(model.lm_head[...][None], parts)[0], threaded)
    _release(model.lm_head, head)
    return head


def split_token_table(model: DalleBart) -> TableBits | None:
    """The decoder's token table as `TableBits`, taken over from the model (its own
    becomes an empty placeholder: it then needs `decode_step(token_table=...)`), when
    the table is bf16/f16; None for float32, whose rows XLA:CPU gathers in place."""
    var = model.dec_embed.tokens
    x = var[...]
    if not (x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)):
        return None
    table = TableBits.of(x)
    _release(var, table)
    return table


def split_encoder_layers(model: DalleBart, release_stacked: bool = False) -> list[dict]:
    """The encoder layers as L separate pytrees (`DalleBart.encode(..., layers=)` says
    why). With `release_stacked` the model can only `encode(..., layers=...)` after."""
    return split_layers(model.enc_layers, model.config.num_encoder_layers, (), release_stacked)


# Folded cross-attention (`TokenSampler.fold_plan`): text positions in steps of this.
FOLD_STEP = 16


def fold_kernels(layers: list[dict]) -> list[tuple[jax.Array, jax.Array]] | None:
    """The L layers' (q, o) cross-attention kernels a sampler can fold (`start_state`'s
    `fold`): threaded (`cpu_dots`) float32 `OutMajor` ones only, else None."""
    c = layers[0]["cross_attn"]
    if not (_one_job(c["q"], c["o"]) and all(w.parts[0].dtype == jnp.float32 for w in (c["q"], c["o"]))):
        return None
    return [(layer["cross_attn"]["q"].parts[0], layer["cross_attn"]["o"].parts[0]) for layer in layers]


# Module-level jitted functions with the model's graphdef (and the mesh, which tracing
# reads through `activate`) as static arguments: two samplers of the same architecture
# share their compilations.
def _start_impl(graphdef, mesh, params, enc_layers, input_ids, attention_mask, rows, uncond_row, token_rows, fold):
    TRACE_COUNTS["start"] += 1
    model = nnx.merge(graphdef, params)
    return start_state(model, input_ids, attention_mask, rows, uncond_row, enc_layers, token_rows, fold)


def _run_impl(graphdef, mesh, params, layers, head, token_table, state, keys, begin, end, temperature,
              guidance, top_p, top_k):
    TRACE_COUNTS["run"] += 1
    model = nnx.merge(graphdef, params)
    return decode_steps(model, layers, head, token_table, state, keys, begin, end, temperature,
                        guidance, top_k, top_p)


_jit_start = jax.jit(_start_impl, static_argnums=(0, 1))
_jit_run = jax.jit(_run_impl, static_argnums=(0, 1), donate_argnums=(6,), static_argnames=("top_k",))


class TokenSampler:
    """Compiled `start_state` / `decode_steps` for one model (and optional mesh).

    The model's parameters are passed to the compiled functions as arguments (not
    baked in as constants), and the decode state is donated, so each chunk updates
    the KV cache in place. The decoder layers are passed as separate per-layer
    buffers (`split_decoder_layers`), and so are the encoder layers
    (`split_encoder_layers`). Calls with the same shapes and the same static
    settings (top_k, whether guided, whether top-p) never retrace; see `TRACE_COUNTS`.

    Args:
      model: a DalleBart (parameters already sharded if `mesh` is given).
      mesh: the mesh its parameters live on, or None. Tracing happens inside
        `sharding.activate(mesh)` so activations follow the rule table.
      release_stacked: hand the stacked encoder and decoder weights, lm_head and a
        16-bit decoder token table (`split_token_table`) over to the sampler instead of
        holding them twice (see `split_layers`); for a model the caller owns.
      text_table: the encoder's token table on the host (typically a memory map of the
        checkpoint), for a model loaded by `DalleBart.from_pretrained_text_table_on_host`;
        each start looks up its prompts' rows there (`host_rows`). None: the model's own.
      image_table: likewise the decoder's token table (`from_pretrained_tables_on_host`),
        read row by row in the decode loop (`HostTable`). None: the model's own.
      cpu_kernels: multiply with `cpu_dots` on a CPU (`dot_layout`): True, False, or
        None for "when the model is big enough to gain".
      fold_cross: fold the cross-attention with each generation's encoder keys/values
        (`fold_cross_attention`), for float32 `cpu_dots` kernels: None when the folded
        products read at most half the kernels' bytes (the prompts' real tokens, in
        steps of `FOLD_STEP`, at most half a head's dimensions), True whatever the
        prompts' lengths (tests), False never.
    """

    def __init__(self, model: DalleBart, mesh=None, release_stacked: bool = False,
                 text_table: np.ndarray | None = None, image_table: np.ndarray | None = None,
                 cpu_kernels: bool | None = None, fold_cross: bool | None = None):
        self.config = model.config
        self.mesh = mesh
        self._text_table = text_table
        self._compiled: set[tuple] = set()  # signatures compiled ahead (`_compile_once`)
        self._table_dtype = model.enc_embed.tokens[...].dtype  # the rows as the device table would hold them
        decoder = jax.tree.leaves(nnx.state(model.dec_layers, nnx.Param))
        step_bytes = sum(x.nbytes for x in decoder) + model.lm_head[...].nbytes
        parts, threaded = dot_layout(mesh, self._table_dtype, step_bytes, cpu_kernels)
        self._layers = split_decoder_layers(model, release_stacked=release_stacked, parts=parts, threaded=threaded)
        # lm_head likewise, when the sampler may take it over (else it would be held twice).
        self._head = split_head(model, parts, threaded) if release_stacked else None
        if image_table is not None:
            self._tokens = HostTable.register(self, image_table, self._table_dtype, native=threaded)
        else:
            self._tokens = split_token_table(model) if release_stacked else None
        self._enc_layers = split_encoder_layers(model, release_stacked=release_stacked)
        self._graphdef, self._params = nnx.split(model)
        self._fold_kernels = fold_kernels(self._layers) if fold_cross is not False else None
        self._fold_always = fold_cross is True

    def start(self, input_ids, attention_mask, rows, uncond_row: int | None) -> DecodeState:
        """See `start_state`; inputs are host arrays."""
        args = self._start_args(input_ids, attention_mask, rows, uncond_row)
        self._compile_once(self._start_key(input_ids, attention_mask, rows, uncond_row),
                           lambda: _jit_start.lower(*args))
        with activate(self.mesh):
            return _jit_start(*args)

    def run(self, state: DecodeState, keys: jax.Array, begin: int, end: int,
            settings: SamplingSettings) -> DecodeState:
        """Decode steps begin..end-1 (see `decode_steps`). `state` is consumed."""
        args, top_k = self._run_args(state, keys, begin, end, settings)
        self._compile_once(self._run_key(state, settings), lambda: _jit_run.lower(*args, top_k=top_k))
        with activate(self.mesh):
            return _jit_run(*args, top_k=top_k)

    def compile_ahead(self, input_ids, attention_mask, rows, uncond_row: int | None, keys: jax.Array,
                      settings: SamplingSettings) -> None:
        """Compile `start` and `run` for these inputs and settings without running either
        (the decode state is `start`'s abstract output): the calls that follow with the
        same shapes and static settings neither trace nor compile. Not for a mesh (not
        tried there: jit's cache would have to see the state's shardings as the real
        call's).

        Why: compiling the decode loop takes ~140 MiB of working memory for DALL-E Mini
        (given back after, `compile_then_trim`), and at the first generation that came
        on top of the start's compiled program and the decode state, the peak of a bf16
        generation (`benchmarks/load_memory.py DIR --dtype bfloat16 --timeline`;
        `DalleMini.compile_for` calls this before generating).
        """
        if self.mesh is not None:
            raise ValueError("compile_ahead is for a sampler without a mesh")
        start = self.lower_start(input_ids, attention_mask, rows, uncond_row)
        self._compile_once(self._start_key(input_ids, attention_mask, rows, uncond_row), lambda: start)
        state = start.out_info  # ShapeDtypeStructs
        self._compile_once(self._run_key(state, settings),
                           lambda: self.lower_run(state, keys, 0, self.config.image_len, settings))

    def _start_key(self, input_ids, attention_mask, rows, uncond_row) -> tuple:
        fold = self.fold_plan(attention_mask)  # the folded positions U are a shape too
        return ("start", np.shape(input_ids), np.shape(rows), uncond_row is None, fold and fold[1].shape)

    def _run_key(self, state: DecodeState, settings: SamplingSettings) -> tuple:
        valid = state.cache.cross_valid  # [rows, U] when folded
        return ("run", state.tokens.shape, self._top_k(settings), settings.guided, settings.uses_top_p,
                None if valid is None else valid.shape)

    def _top_k(self, settings: SamplingSettings) -> int | None:
        """`settings.top_k` as the decode loop takes it (a static int, or None)."""
        top_k = settings.top_k
        if top_k is not None and top_k >= self.config.num_image_codes:
            return None  # keeping every code is no filter: skip the work
        return None if top_k is None else int(top_k)

    def _compile_once(self, key: tuple, lower) -> None:
        """On a signature's first call, compile ahead and give the compiler's memory back
        (`compile_then_trim`); jit's cache then serves the call itself."""
        if key not in self._compiled:
            with activate(self.mesh):
                compile_then_trim(lower)
            self._compiled.add(key)

    def lower_start(self, input_ids, attention_mask, rows, uncond_row: int | None):
        """`start`'s compiled function for these inputs, lowered (not run): for memory
        and HLO inspection (`.compile().memory_analysis()`, `.as_text()`)."""
        with activate(self.mesh):
            return _jit_start.lower(*self._start_args(input_ids, attention_mask, rows, uncond_row))

    def lower_run(self, state: DecodeState, keys: jax.Array, begin: int, end: int,
                  settings: SamplingSettings):
        """`run`'s compiled function for these inputs, lowered (not run; `state` is kept)."""
        args, top_k = self._run_args(state, keys, begin, end, settings)
        with activate(self.mesh):
            return _jit_run.lower(*args, top_k=top_k)

    def _start_args(self, input_ids, attention_mask, rows, uncond_row) -> tuple:
        fold = self.fold_plan(attention_mask)
        return (self._graphdef, self.mesh, self._params, self._enc_layers,
                jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                jnp.asarray(rows, jnp.int32), None if uncond_row is None else jnp.int32(uncond_row),
                self.token_rows(input_ids),
                None if fold is None else (jnp.asarray(fold[0]), jnp.asarray(fold[1]), self._fold_kernels))

    def fold_plan(self, attention_mask) -> tuple[np.ndarray, np.ndarray] | None:
        """The text positions a start folds the cross-attention over (`start_state`'s
        `fold`), or None where it does not fold.

        Every prompt's real tokens in one list of U, padded to a multiple of `FOLD_STEP`:
        the folded products read U / K of the kernels' bytes (K the head size), and the
        steps keep the number of compiled variants small (a different U is a different
        program: with DALL-E Mini's K = 64, U = 16 or 32).

        Returns:
          (cols [U, 2] int32 (text row, position), col_valid [U] bool) or None.
        """
        if self._fold_kernels is None:
            return None
        text_rows, positions = np.nonzero(np.asarray(attention_mask))
        n = text_rows.size
        U = -(-max(n, 1) // FOLD_STEP) * FOLD_STEP
        if not self._fold_always and 2 * U > self.config.head_dim:
            return None
        cols = np.zeros((U, 2), np.int32)
        cols[:n, 0], cols[:n, 1] = text_rows, positions
        return cols, np.arange(U) < n

    def decode_step(self, model: DalleBart, last: jax.Array, position: jax.Array,
                    cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """One unguided decoder step of `model` (this sampler's model) with the weights
        the sampler holds, eagerly: for probes that step the decoder by hand.
        [B] token ids at `position` -> ([B, V] logits, the updated cache)."""
        with activate(self.mesh):
            return step_logits(model, self._layers, self._head, self._tokens, last, position, cache,
                               guided=False)

    def token_rows(self, input_ids) -> jax.Array | None:
        """[P, T, D] float32 rows of `input_ids` from the host token table, for
        `DalleBart.encode(token_rows=)`; None when the model holds its own table."""
        if self._text_table is None:
            return None
        return jnp.asarray(host_rows(self._text_table, input_ids, self._table_dtype))

    def _run_args(self, state, keys, begin, end, settings: SamplingSettings) -> tuple[tuple, int | None]:
        args = (self._graphdef, self.mesh, self._params, self._layers, self._head, self._tokens, state, keys,
                jnp.int32(begin), jnp.int32(end), jnp.float32(settings.temperature),
                jnp.float32(settings.guidance) if settings.guided else None,
                jnp.float32(settings.top_p) if settings.uses_top_p else None)
        return args, self._top_k(settings)
