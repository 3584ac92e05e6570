"""DalleBart: the BPE text encoder and the autoregressive image-token decoder (Flax NNX).

Maths as in the released DALL·E Mini / Mega checkpoints (reference §1):

  encoder:  h = LN_emb(E_tok[ids] + E_pos);  per layer (normformer)
              h = h + LN_post(SelfAttn(LN_pre h, pad mask));  h = h + GLU(h)
            out = final_ln(h)                                   [B, T, D]
  decoder:  h = LN_emb(E_tok[tokens] + E_pos);  per layer
              h = h + LN_post(CausalSelfAttn(LN_pre h))
              h = h + LN_post'(CrossAttn(LN_pre' h, enc, pad mask))
              h = h + GLU(h)
            logits = final_ln(h) @ lm_head                      [B, S, V]
  GLU(x) = W2( LN_mid( gelu(W0 LN_pre x) * (W1 LN_pre x) ) )

Norms are LayerNorm eps 1e-5; the "bias-only" ones have no scale. `preln` drops the
post-attention and mid-GLU norms. No dense biases anywhere.

Layers are stored stacked ([L, ...] leading axis) like the released scanned checkpoint,
so loading is a rename. The full-sequence path runs them with `lax.scan` (optionally
rematerialised, for training); the one-token decode step unrolls them so that XLA
reads each layer's weights and cache slices in place.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import checkpoint as ckpt
from . import cpu_dots
from .float_bits import bits, unbits
from .attention import attend_cache, attend_one, attention, causal_mask, masked_softmax, padding_mask
from .config import DalleBartConfig
from .sharding import constrain, param, state_shardings

_ACT: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
}


# --------------------------------------------------------------------------------------
# Building blocks (weights only; maths in the pure functions below)
# --------------------------------------------------------------------------------------


class Norm(nnx.Module):
    """LayerNorm weights: a bias, and a scale unless `use_scale=False` (bias-only)."""

    def __init__(self, lead: tuple[int, ...], dim: int, use_scale: bool, param_dtype, axis: str = "norm"):
        names = ("layers",) * len(lead) + (axis,)
        self.bias = param(jnp.zeros(lead + (dim,), param_dtype), names)
        self.scale = param(jnp.ones(lead + (dim,), param_dtype), names) if use_scale else None


def layer_norm(x: jax.Array, p: dict[str, jax.Array], eps: float) -> jax.Array:
    """LayerNorm over the last axis; statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if p.get("scale") is not None:
        y = y * p["scale"].astype(jnp.float32)
    y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


class AttentionWeights(nnx.Module):
    """q/k/v/out projections of one attention per layer: [L, D, D] each (no biases)."""

    def __init__(self, L: int, D: int, init, rngs: nnx.Rngs, param_dtype):
        def kernel(out_axis_names):
            return param(init(rngs.params(), (L, D, D), param_dtype), ("layers",) + out_axis_names)

        self.q = kernel(("embed", "heads"))
        self.k = kernel(("embed", "heads"))
        self.v = kernel(("embed", "heads"))
        self.o = kernel(("heads", "embed"))


class MlpWeights(nnx.Module):
    """GLU (gate, value, out) or plain FFN (gate, out) weights, with their norms."""

    def __init__(self, cfg: DalleBartConfig, L: int, init, rngs: nnx.Rngs, param_dtype):
        D, F = cfg.embed_dim, cfg.mlp_dim
        self.pre = Norm((L,), D, False, param_dtype)
        self.wi_gate = param(init(rngs.params(), (L, D, F), param_dtype), ("layers", "embed", "mlp"))
        self.wi_value = (
            param(init(rngs.params(), (L, D, F), param_dtype), ("layers", "embed", "mlp"))
            if cfg.use_glu
            else None
        )
        self.mid = Norm((L,), F, False, param_dtype, axis="mlp") if cfg.ln_positions == "normformer" else None
        self.wo = param(init(rngs.params(), (L, F, D), param_dtype), ("layers", "mlp", "embed"))


class Layers(nnx.Module):
    """The stacked layers of one stack (encoder: self-attention + MLP; decoder adds cross)."""

    def __init__(self, cfg: DalleBartConfig, L: int, cross: bool, init, rngs, param_dtype):
        D = cfg.embed_dim
        post = cfg.ln_positions == "normformer"
        self.self_pre = Norm((L,), D, False, param_dtype)
        self.self_attn = AttentionWeights(L, D, init, rngs, param_dtype)
        self.self_post = Norm((L,), D, True, param_dtype) if post else None
        if cross:
            self.cross_pre = Norm((L,), D, False, param_dtype)
            self.cross_attn = AttentionWeights(L, D, init, rngs, param_dtype)
            self.cross_post = Norm((L,), D, True, param_dtype) if post else None
        self.mlp = MlpWeights(cfg, L, init, rngs, param_dtype)


class Embedder(nnx.Module):
    """Token table, learned absolute position table and the embedding LayerNorm; with
    `grid`, also learned row and column tables [grid, D] (`image_pos_2d`)."""

    def __init__(self, vocab: int, length: int, D: int, init, rngs, param_dtype, grid: int = 0):
        self.tokens = param(init(rngs.params(), (vocab, D), param_dtype), ("vocab", "embed"))
        self.positions = param(init(rngs.params(), (length, D), param_dtype), ("positions", "embed"))
        self.rows = param(init(rngs.params(), (grid, D), param_dtype), ("positions", "embed")) if grid else None
        self.cols = param(init(rngs.params(), (grid, D), param_dtype), ("positions", "embed")) if grid else None
        self.norm = Norm((), D, True, param_dtype)


def _values(module: nnx.Module | None) -> Any:
    """The plain-array pytree of a module's params (None stays None)."""
    if module is None:
        return None
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


# --------------------------------------------------------------------------------------
# Pure layer maths
# --------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutMajor:
    """A dense kernel held transposed and cut along its outputs, for decode steps.

    `parts[i]` is [out_i, in], the model's [in, out] kernel's columns e_i..e_{i+1}
    transposed; `_dense` computes x @ W as the parts' W_i @ x^T, concatenated.

    Why, for the few rows of a decode step (2 for one guided image, 18 for a 3x3
    grid), on XLA:CPU: (1) an [out, in] kernel multiplies faster than [in, out] when
    there are many rows; (2) XLA:CPU runs each small dot on one thread, while
    independent dots run at once on different threads, so a kernel cut in as many
    parts as the CPU has cores is read by all of them. `python
    benchmarks/decode_step.py DIR` (random DALL-E Mini, fp32, 2-core CPU, 2026-12-02):
    one image 61.0 ms a step as [in, out], 69.8 as one [out, in] part, 50.8 in 2 parts
    (1.20x), 48.9 with lm_head in 2 parts too (1.25x); a 3x3 grid 190.7, 146.3, 131.7,
    124.7 (1.53x). Same values up to summation order.

    `threaded`: one part, multiplied by `cpu_dots.rows_dot`, which splits every dot
    over all cores itself (the parts above overlap only part of the time); the
    sampler's layout on a CPU where that kernel builds (`sampling.dot_layout`).
    """

    parts: tuple[jax.Array, ...]
    threaded: bool = dataclasses.field(default=False, metadata=dict(static=True))


def _threaded(tree: Any) -> bool:
    """Whether `tree` holds `OutMajor` kernels multiplied by `cpu_dots` (`threaded`)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, OutMajor))
    return any(isinstance(x, OutMajor) and x.threaded for x in leaves)


def _dense(spec: str, x: jax.Array, w: jax.Array | OutMajor) -> jax.Array:
    """einsum(spec, x, w) in x's dtype, accumulated in float32.

    `spec` contracts x's last axis with w's first; with `w` an `OutMajor` the same
    product is taken part by part (see there), and spec only documents it.

    Why float32 accumulation: with bfloat16 weights and activations, a bf16-output dot
    is one XLA:CPU cannot run natively; it widens both operands to float32, and inside
    the decode loop the widened weights are loop-invariant, so XLA hoists them out: a
    full float32 copy of the decoder lived through every generation. A bf16 x bf16 ->
    f32 dot runs as it is. (With `_rows` and `encode(layers=)`: DALL-E Mini's bf16 peak
    RSS 1.73 GB, was 2.30.) For float32 weights nothing changes.
    """
    return _dense_f32(spec, x, w).astype(x.dtype)


def _dense_f32(spec: str, x: jax.Array, w: jax.Array | OutMajor) -> jax.Array:
    """`_dense` with its float32 result (logits stay float32)."""
    if isinstance(w, OutMajor):
        rows = x.reshape(-1, x.shape[-1])
        if w.threaded:
            y = jnp.concatenate(cpu_dots.rows_dot(rows, w.parts), axis=-1)
        else:
            y = jnp.concatenate([jnp.einsum("ok,mk->om", t.astype(x.dtype), rows, preferred_element_type=jnp.float32)
                                 for t in w.parts]).T
        return y.reshape(x.shape[:-1] + (y.shape[-1],))
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _proj(x: jax.Array, w: jax.Array, H: int) -> jax.Array:
    """[B, N, D] @ [D, H*K] -> [B, N, H, K]."""
    y = _dense("bnd,de->bne", x, w)
    return y.reshape(y.shape[:-1] + (H, -1))


def _one_job(*ws: Any) -> bool:
    """Whether these kernels are threaded single parts that one `cpu_dots` call can take."""
    return all(isinstance(w, OutMajor) and w.threaded and len(w.parts) == 1 for w in ws)


def _kernel_norm(x: jax.Array, norm: dict | None, eps: float) -> tuple[jax.Array, tuple | None]:
    """(x, norm) for a `cpu_dots` call on layer_norm(x, norm) (on x when norm is None).

    The kernel normalizes float32 x with float32 weights itself (one call instead of
    ~5 small XLA ops a norm, ~14 us each in a DALL-E Mini step); otherwise
    `layer_norm` runs here, rounding to x's dtype as it always does, and the kernel
    gets no norm.
    """
    if norm is None:
        return x, None
    weights = _f32_norm(norm)
    if x.dtype == jnp.float32 and weights is not None:
        return x, weights
    return layer_norm(x, norm, eps), None


def _f32_norm(norm: dict) -> tuple | None:
    """A norm's (bias, scale or None) for a `cpu_dots` call, if all are float32 (else None)."""
    weights = (norm["bias"], norm.get("scale"))
    return weights if all(w is None or w.dtype == jnp.float32 for w in weights) else None


def _dense_many(x: jax.Array, ws: Sequence[jax.Array | OutMajor], norm: dict | None = None,
                eps: float = 0.0) -> list[jax.Array]:
    """`_dense` of layer_norm(x, norm) (of x when norm is None) by each kernel:
    [B, N, D] -> [B, N, E_i] in x's dtype.

    Threaded kernels (`cpu_dots`) take one call for all (q, k and v: one job for the
    pool instead of three that XLA may issue from different threads, which take turns
    on it and change the order in which the pool learns what to read ahead), with the
    norm in it (`_kernel_norm`).
    """
    if not _one_job(*ws):
        x = x if norm is None else layer_norm(x, norm, eps)
        return [_dense("bnd,de->bne", x, w) for w in ws]
    x, norm = _kernel_norm(x, norm, eps)
    ys = cpu_dots.rows_dot(x.reshape(-1, x.shape[-1]), [w.parts[0] for w in ws], norm=norm, eps=eps)
    return [y.astype(x.dtype).reshape(x.shape[:-1] + (-1,)) for y in ys]


def _projs(x: jax.Array, ws: Sequence[jax.Array | OutMajor], H: int, norm: dict | None = None,
           eps: float = 0.0) -> list[jax.Array]:
    """`_proj` of layer_norm(x, norm) (of x when norm is None) by each kernel: [B, N, H, K]s."""
    return [y.reshape(y.shape[:-1] + (H, -1)) for y in _dense_many(x, ws, norm, eps)]


def _add_dense(h: jax.Array, x: jax.Array, w: jax.Array | OutMajor, pre: dict | None, post: dict | None,
               eps: float) -> jax.Array:
    """A residual branch's last product: h + post_norm(pre_norm(x) @ w), [B, N, D].

    x: [B, N, E]; pre / post: LayerNorm weights or None. A threaded kernel
    (`cpu_dots`) with float32 h takes both norms and the add in its call (each norm
    otherwise ~5 small XLA ops, the add one more: ~0.5 ms of a DALL-E Mini step).
    """
    post_w = None if post is None else _f32_norm(post)
    if _one_job(w) and h.dtype == jnp.float32 and (post is None or post_w is not None):
        x, pre_w = _kernel_norm(x, pre, eps)
        y = cpu_dots.rows_dot(x.reshape(-1, x.shape[-1]), [w.parts[0]], norm=pre_w, eps=eps, post=post_w,
                              residual=h.reshape(-1, h.shape[-1]))[0]
        return y.reshape(h.shape)
    y = _dense_many(x, (w,), pre, eps)[0]
    return h + (y if post is None else layer_norm(y, post, eps))


def _mlp(cfg: DalleBartConfig, p: dict, x: jax.Array) -> jax.Array:
    """x + the GLU / FFN block of x, [B, N, D] (its own pre-norm included)."""
    act, eps = _ACT[cfg.activation], cfg.layer_norm_eps
    if (cfg.activation == "gelu" and x.dtype == jnp.float32 and p.get("wi_value") is not None
            and _one_job(p["wi_gate"], p["wi_value"])):
        # The norm, both products and the GLU in one `cpu_dots` call (XLA:CPU's own
        # gelu * value cost ~0.8 ms of a DALL-E Mini decode step:
        # `benchmarks/decode_profile.py`).
        h, norm = _kernel_norm(x, p["pre"], eps)
        g = cpu_dots.gelu_glu(h.reshape(-1, h.shape[-1]), p["wi_gate"].parts[0], p["wi_value"].parts[0],
                              norm=norm, eps=eps)
        g = g.reshape(h.shape[:-1] + (-1,))
    else:
        h = layer_norm(x, p["pre"], eps)
        g = act(_dense("bnd,df->bnf", h, p["wi_gate"]))
        if p.get("wi_value") is not None:
            g = g * _dense("bnd,df->bnf", h, p["wi_value"])
    g = constrain(g, ("act_batch", "act_len", "act_mlp"))
    return _add_dense(x, g, p["wo"], p.get("mid"), None, eps)


def _encoder_layer(cfg: DalleBartConfig, p: dict, h: jax.Array, mask: jax.Array) -> jax.Array:
    H, eps = cfg.num_heads, cfg.layer_norm_eps
    a = p["self_attn"]
    x = layer_norm(h, p["self_pre"], eps)
    y = attention(_proj(x, a["q"], H), _proj(x, a["k"], H), _proj(x, a["v"], H), mask)
    h = _add_dense(h, y.reshape(y.shape[:-2] + (-1,)), a["o"], None, p.get("self_post"), eps)
    h = _mlp(cfg, p["mlp"], h)
    return constrain(h, ("act_batch", "act_len", "act_embed"))


def _decoder_layer(
    cfg: DalleBartConfig,
    p: dict,
    h: jax.Array,
    self_attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    cross_attend: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """One decoder layer on [B, N, D].

    `self_attend(q, k, v)` and `cross_attend(q)` (q, k, v: [B, N, H, K]) hide full
    versus cached attention; the cross-attention keys/values live in the closure.
    """
    H, eps = cfg.num_heads, cfg.layer_norm_eps
    a, c = p["self_attn"], p["cross_attn"]
    y = self_attend(*_projs(h, (a["q"], a["k"], a["v"]), H, p["self_pre"], eps))
    h = _add_dense(h, y.reshape(y.shape[:-2] + (-1,)), a["o"], None, p.get("self_post"), eps)
    y = cross_attend(_projs(h, (c["q"],), H, p["cross_pre"], eps)[0])
    h = _add_dense(h, y.reshape(y.shape[:-2] + (-1,)), c["o"], None, p.get("cross_post"), eps)
    h = _mlp(cfg, p["mlp"], h)
    return constrain(h, ("act_batch", "act_len", "act_embed"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableBits:
    """A bf16/f16 table held as its bits, for the row lookups of a decode loop.

    Why: `_rows` gathers a 16-bit float table's bits (see there), but inside a jitted
    loop the bitcast of the whole table is itself loop-invariant: XLA:CPU hoists it and
    keeps a uint16 copy of the table through every generation (DALL-E Mini's decoder
    token table in bf16: 16,385 x 1,024 x 2 bytes = 32 MiB of the decode loop's 61 MiB
    of temporaries, `python benchmarks/load_memory.py DIR --dtype bfloat16 --compiled`).
    Held as bits from the start, there is nothing to copy. A sampler given the model
    (`release_stacked`) takes the decoder's table over this way
    (`sampling.split_token_table`); a CPU pipeline leaves it in the file instead
    (`sampling.HostTable`), a pipeline with a mesh or on an accelerator uses this.
    """

    bits: jax.Array  # [V, D] uint16
    dtype: Any = dataclasses.field(metadata=dict(static=True))  # the float dtype they encode

    @classmethod
    def of(cls, table: jax.Array) -> "TableBits":
        """The bits of a bf16/f16 `table` (a new buffer, placed like `table`)."""
        return cls(jax.lax.bitcast_convert_type(table, jnp.uint16), table.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape


def _rows(table: jax.Array | TableBits, idx: jax.Array) -> jax.Array:
    """table[idx] as float32, reading only the rows asked for.

    Why the bit-level gather: XLA:CPU widens a bf16/f16 gather's whole table to float32
    (moving the convert above the gather), and in the decode loop that copy is
    loop-invariant, so it is hoisted and kept: 16,385 x 1,024 x 4 bytes = 67 MB for DALL-E
    Mini's token table. A gather of 16-bit integers is never widened; the rows are
    reinterpreted after it. A `TableBits` is gathered as it is.
    """
    if isinstance(table, TableBits):
        return jax.lax.bitcast_convert_type(table.bits[idx], table.dtype).astype(jnp.float32)
    if table.dtype.itemsize == 2 and jnp.issubdtype(table.dtype, jnp.floating):
        return _rows16(table, idx)
    return table[idx].astype(jnp.float32)


@jax.custom_jvp
def _rows16(table: jax.Array, idx: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(table, jnp.uint16)[idx]
    return jax.lax.bitcast_convert_type(bits, table.dtype).astype(jnp.float32)


@_rows16.defjvp
def _rows16_jvp(primals, tangents):
    # A bitcast has no derivative; the gather it stands for does (training with bf16
    # parameters differentiates through the embeddings).
    table, idx = primals
    return _rows16(table, idx), tangents[0][idx].astype(jnp.float32)


def _embed(cfg: DalleBartConfig, e: dict, ids: jax.Array, positions: jax.Array, dtype,
           token_rows: jax.Array | None = None) -> jax.Array:
    if token_rows is None:
        if e["tokens"].shape[0] == 0:
            raise ValueError("this model's token table was left on the host (an empty placeholder, "
                             "see `host_rows`): pass its rows as token_rows=")
        token_rows = _rows(e["tokens"], ids)
    h = token_rows.astype(jnp.float32) + _rows(e["positions"], positions)
    if e.get("rows") is not None:
        # Decoder position p holds token p-1 and predicts token p: the row and column
        # are those of the token being predicted.
        g = cfg.image_grid
        h = h + _rows(e["rows"], positions // g) + _rows(e["cols"], positions % g)
    h = layer_norm(h, e["norm"], cfg.layer_norm_eps).astype(dtype)
    return constrain(h, ("act_batch", "act_len", "act_embed"))


TEXT_TABLE = "enc_embed/tokens"  # the encoder's token table, in our parameter paths
IMAGE_TABLE = "dec_embed/tokens"  # the decoder's (image-token) table


def host_rows(table: np.ndarray, ids: np.ndarray, dtype) -> np.ndarray:
    """table[ids] read on the host: [..., D] float32 rows, rounded to `dtype` first.

    For a token table kept out of device memory (`from_released_params(on_host=...)`,
    typically a `np.memmap` of the checkpoint: only the rows read are ever resident).
    Equal to what the device lookup (`_rows`) gives for the same table loaded in `dtype`.
    """
    rows = np.asarray(table[np.asarray(ids)])
    return rows.astype(jnp.dtype(dtype)).astype(np.float32)


def _layer_slice(tree: Any, l: int) -> Any:
    return jax.tree.map(lambda x: x[l], tree)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


# Logical axes of a decode cache's [L, B, H, S, K] arrays (`DecodeCache`).
CACHE_AXES = (None, "act_batch", "act_heads", "act_len", "act_kv")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeCache:
    """Everything the one-token decode step needs besides the weights.

    Attributes:
      self_k, self_v: [L, B, H, S, K] keys/values of the tokens decoded so far, or a
        list of L [B, H, S, K] arrays (separate buffers, which XLA updates in place).
        Heads before positions: the layout `attention.attend_one` reads in place.
        With a 16-bit compute dtype they hold the values' uint16 bits (`float_bits`):
        XLA:CPU widened each bf16 cache to float32 to write one position into it, and
        copied it back, every step: DALL-E Mini's bf16 decode loop had 29.2 MiB of
        temporaries, 12 MiB of them cache copies (`benchmarks/load_memory.py DIR
        --dtype bfloat16 --compiled`).
      cross_k, cross_v: [L, B, H, T, K] encoder keys/values, computed once per prompt,
        or a list of L [B, H, T, K] arrays; None when folded (below).
      enc_mask: [B, 1, 1, T] encoder padding mask.
      cross_qk, cross_vo: None, or the cross-attention folded with the encoder's
        keys/values (`fold_cross_attention`): L [H*U, D] and L [D, H*U] float32 arrays
        over U text positions (every prompt's real tokens, in one list).
      cross_valid: [B, U] bool with the folded form: which of the U positions each row
        attends to (its own prompt's).
    """

    self_k: jax.Array
    self_v: jax.Array
    cross_k: jax.Array | None
    cross_v: jax.Array | None
    enc_mask: jax.Array
    cross_qk: list[jax.Array] | None = None
    cross_vo: list[jax.Array] | None = None
    cross_valid: jax.Array | None = None


def fold_cross_attention(q: jax.Array, o: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoder layer's cross-attention products folded with fixed encoder keys/values.

    A decode step's cross-attention reads two [D, D] kernels (q and o) for keys and values
    that never change while an image is decoded. Per head h, the logits of a normalized
    hidden state x are (x W_q,h) k_h^T / sqrt(K) = x (W_q,h k_h^T / sqrt(K)), and the
    output is sum_h softmax_h (v_h W_o,h): both products can take [D, H*U] matrices
    computed once per generation instead, which are smaller than the kernels when the
    prompts have fewer real tokens U than a head has dimensions K. DALL-E Mini (K = 64),
    one guided prompt of 9 tokens (U = 9 + 2 unconditional, 16 with padding): 1 MiB
    instead of 4 MiB each: 72 MiB (75 MB) less of the 772 MB a step reads.

    Args:
      q: [H*K, D] the query kernel, out-major (`OutMajor`'s part).
      o: [D, H*K] the output kernel, out-major.
      k, v: [U, H, K] encoder keys/values of the U text positions.

    Returns:
      (qk [H*U, D], vo [D, H*U]) float32, out-major: rows_dot(layer_norm(h), qk) are
      the scaled logits [B, H*U], rows_dot(softmax weights [B, H*U], vo) the attention
      output through the o kernel [B, D]. The same values up to summation order.
    """
    U, H, K = k.shape
    D = q.shape[1]
    f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
    qk = jnp.einsum("hkd,uhk->hud", q.reshape(H, K, D).astype(f32), k.astype(f32), precision=hi) * K**-0.5
    vo = jnp.einsum("ehk,uhk->ehu", o.reshape(D, H, K).astype(f32), v.astype(f32), precision=hi)
    return qk.reshape(H * U, D), vo.reshape(D, H * U)


class DalleBart(nnx.Module):
    """Text encoder + image-token decoder.

    Args:
      config: the model shape and options.
      rngs: initialisation randomness (normal(init_std) everywhere, norms 1/0).
      dtype: compute dtype (activations, cache).
      param_dtype: storage dtype of the weights.
    """

    def __init__(self, config: DalleBartConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.remat = False  # rematerialise each layer in the full-sequence path (training)
        cfg = config
        init = jax.nn.initializers.normal(cfg.init_std)
        D = cfg.embed_dim
        self.enc_embed = Embedder(cfg.text_vocab_size, cfg.text_len, D, init, rngs, param_dtype)
        self.enc_layers = Layers(cfg, cfg.num_encoder_layers, False, init, rngs, param_dtype)
        self.enc_final = Norm((), D, False, param_dtype) if cfg.use_final_ln else None
        self.dec_embed = Embedder(cfg.decoder_vocab_size, cfg.image_len, D, init, rngs, param_dtype,
                                  grid=cfg.image_grid if cfg.image_pos_2d else 0)
        self.dec_layers = Layers(cfg, cfg.num_decoder_layers, True, init, rngs, param_dtype)
        self.dec_final = Norm((), D, False, param_dtype) if cfg.use_final_ln else None
        self.lm_head = param(init(rngs.params(), (D, cfg.decoder_vocab_size), param_dtype), ("embed", "vocab"))

    # ---- forward ---------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array) -> jax.Array:
        """Teacher-forced logits.

        Args:
          input_ids: [B, T] int text tokens.
          attention_mask: [B, T] 1 for real tokens, 0 for padding.
          decoder_input_ids: [B, S'] int, S' <= image_len: BOS then image tokens.

        Returns:
          logits [B, S', V] (V = image_vocab_size + 1), float32.
        """
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, attention_mask)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array,
               layers: list[Any] | None = None, token_rows: jax.Array | None = None) -> jax.Array:
        """[B, T] ids, [B, T] mask -> encoder output [B, T, D] (compute dtype).

        Args:
          token_rows: optional [B, T, D] float32, the token-table rows of `input_ids`
            looked up elsewhere (`host_rows`): required when the table was left on the
            host, where the model holds an empty placeholder.
          layers: optional, the encoder layer weights as L separate pytrees (each like
            `self.enc_layers` without its [L] axis), run one after the other instead of
            a `lax.scan` over the stacked weights. Same output. Why the sampler passes
            them: XLA:CPU widens a bf16 `dynamic-slice` to float32 and hoists the
            widening out of the scan, so a scan over bf16 weights holds a float32 copy
            of the whole encoder while it runs (DALL-E Mini: 151 M parameters, 604 MB).
        """
        cfg = self.config
        self._check_text(input_ids, attention_mask)
        T = input_ids.shape[1]
        h = _embed(cfg, _values(self.enc_embed), input_ids, jnp.arange(T), self.dtype, token_rows)
        mask = padding_mask(attention_mask)
        if layers is not None:
            for p in layers:
                h = _encoder_layer(cfg, p, h, mask)
            return self._final(h, self.enc_final)

        def body(h, p):
            return _encoder_layer(cfg, p, h, mask), None

        h, _ = jax.lax.scan(self._maybe_remat(body), h, _values(self.enc_layers))
        return self._final(h, self.enc_final)

    def decode(self, decoder_input_ids: jax.Array, enc: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Full-sequence decoder: [B, S'] tokens + encoder output -> logits [B, S', V] float32."""
        cfg = self.config
        S = decoder_input_ids.shape[1]
        if S > cfg.image_len:
            raise ValueError(f"decoder_input_ids has {S} positions; the model has image_len={cfg.image_len}")
        h = _embed(cfg, _values(self.dec_embed), decoder_input_ids, jnp.arange(S), self.dtype)
        enc_mask = padding_mask(attention_mask)
        mask = causal_mask(S)
        H = cfg.num_heads

        def body(h, p):
            c = p["cross_attn"]
            ck, cv = _proj(enc, c["k"], H), _proj(enc, c["v"], H)
            attend = lambda q, k, v: attention(q, k, v, mask)  # noqa: E731
            cross = lambda q: attention(q, ck, cv, enc_mask)  # noqa: E731
            return _decoder_layer(cfg, p, h, attend, cross), None

        h, _ = jax.lax.scan(self._maybe_remat(body), h, _values(self.dec_layers))
        return self._logits(h)

    # ---- KV-cached decoding ---------------------------------------------------------
    def init_cache(self, enc: jax.Array, attention_mask: jax.Array) -> DecodeCache:
        """Preallocate the self-attention cache and compute cross-attention K/V once.

        Args:
          enc: [B, T, D] encoder output.
          attention_mask: [B, T].
        """
        cfg = self.config
        B, T, _ = enc.shape
        L, H, K, S = cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim, cfg.image_len
        cross = _values(self.dec_layers)["cross_attn"]
        # As L batched products of the encoder output (copied L times: [L, B*T, D], small)
        # with each layer's [D, H*K] kernel: contracted as "btd,lde" instead, XLA
        # transposes each stacked [L, D, D] kernel first, 96 MiB of temporaries for
        # DALL-E Mini's k and v in float32 (`benchmarks/load_memory.py --compiled`).
        x = jnp.broadcast_to(enc.reshape(1, B * T, -1), (L, B * T, enc.shape[-1]))
        ck = _dense("lnd,lde->lne", x, cross["k"]).reshape(L, B, T, H, K).transpose(0, 1, 3, 2, 4)
        cv = _dense("lnd,lde->lne", x, cross["v"]).reshape(L, B, T, H, K).transpose(0, 1, 3, 2, 4)
        zeros = bits(jnp.zeros((L, B, H, S, K), self.dtype))
        return DecodeCache(
            self_k=constrain(zeros, CACHE_AXES),
            self_v=constrain(zeros, CACHE_AXES),
            cross_k=constrain(ck, CACHE_AXES),
            cross_v=constrain(cv, CACHE_AXES),
            enc_mask=padding_mask(attention_mask),
        )

    def decode_step(self, tokens: jax.Array, position: jax.Array, cache: DecodeCache,
                    layers: list[Any] | None = None,
                    head: OutMajor | None = None,
                    token_table: TableBits | None = None,
                    token_rows: jax.Array | None = None) -> tuple[jax.Array, DecodeCache]:
        """Logits for one position, given all earlier ones in the cache.

        Args:
          tokens: [B] int, the token at `position` (BOS at position 0).
          position: scalar int32 in [0, image_len).
          cache: from `init_cache`, holding positions < `position`.
          layers: optional, the decoder layer weights as L separate pytrees (each like
            `self.dec_layers` without its [L] axis; cross-attention k/v may be left
            out: they live in the cache). XLA:CPU copies a slice of a stacked weight
            before a dot, which triples the memory traffic of a weight-bound step;
            the sampler passes separate per-layer buffers instead. Same logits.
          head: optional, lm_head as an `OutMajor` (the sampler's), else the model's.
          token_table: optional, the decoder's token table as `TableBits` (the
            sampler's, for 16-bit weights), else the model's.
          token_rows: optional, [B, D] float32 rows of `tokens` read elsewhere (the
            decoder's table left on the host, `from_pretrained_tables_on_host`).

        Returns:
          (logits [B, V] float32 predicting position+1's token, the updated cache).
        """
        cfg = self.config
        embed = _values(self.dec_embed)
        if token_table is not None:
            embed = {**embed, "tokens": token_table}
        h = _embed(cfg, embed, tokens[:, None], position[None], self.dtype,
                   None if token_rows is None else token_rows[:, None])
        stacked = _values(self.dec_layers) if layers is None else None
        # Each layer first writes its new key/value into the cache, then attends over
        # positions <= `position` of the updated cache, so every read of the cache comes
        # after (depends on) its write. With per-layer cache buffers (a list, as the
        # sampler keeps them) XLA then updates each in place; a stacked [L, ...] cache
        # works too but XLA:CPU copies it every step.
        per_layer = isinstance(cache.self_k, (list, tuple))
        self_k = list(cache.self_k) if per_layer else cache.self_k
        self_v = list(cache.self_v) if per_layer else cache.self_v
        enc_valid = cache.enc_mask[:, 0, 0, :]  # [B, T]
        folded = cache.cross_qk is not None
        # With the sampler's threaded kernels (`cpu_dots`), attention runs there too: on
        # all cores, reading only the cache positions written so far.
        on_cores = (per_layer and layers is not None and _threaded(layers[0])
                    and cpu_dots.attends(cfg.embed_dim // cfg.num_heads, self.dtype))
        everywhere = jnp.ones((1, self_k[0].shape[2]), bool) if on_cores else None  # every position may be attended
        for l in range(cfg.num_decoder_layers):

            def attend(q, k, v, l=l):
                nonlocal self_k, self_v
                k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, 1, K]
                # The cache holds 16-bit keys/values as their bits (`DecodeCache`).
                k, v = bits(k.astype(self.dtype)), bits(v.astype(self.dtype))
                if per_layer:
                    at = (0, 0, position, 0)
                    self_k[l] = jax.lax.dynamic_update_slice(self_k[l], k, at)
                    self_v[l] = jax.lax.dynamic_update_slice(self_v[l], v, at)
                else:
                    at = (l, 0, 0, position, 0)
                    self_k = jax.lax.dynamic_update_slice(self_k, k[None], at)
                    self_v = jax.lax.dynamic_update_slice(self_v, v[None], at)
                if on_cores:  # only the filled positions are read
                    y = cpu_dots.attend(q[:, 0], self_k[l], self_v[l], everywhere, position + 1)
                    return y.astype(q.dtype)[:, None]
                return attend_cache(q[:, 0], unbits(self_k[l], self.dtype), unbits(self_v[l], self.dtype),
                                    position)[:, None]

            def cross(q, l=l):
                if folded:  # q holds the logits [B, 1, H, U] (`fold_cross_attention`)
                    weights = masked_softmax(q[:, 0].astype(jnp.float32), cache.cross_valid[:, None, :])
                    return weights.astype(q.dtype)[:, None]
                if on_cores:
                    k, v = cache.cross_k[l], cache.cross_v[l]
                    return cpu_dots.attend(q[:, 0], k, v, enc_valid, k.shape[2]).astype(q.dtype)[:, None]
                return attend_one(q[:, 0], cache.cross_k[l], cache.cross_v[l], enc_valid)[:, None]

            p = _layer_slice(stacked, l) if layers is None else layers[l]
            if folded:
                threaded = _threaded(p["cross_attn"])
                p = {**p, "cross_attn": {"q": OutMajor((cache.cross_qk[l],), threaded),
                                         "o": OutMajor((cache.cross_vo[l],), threaded)}}
            h = _decoder_layer(cfg, p, h, attend, cross)
        logits = self._logits(h, head)[:, 0]
        cache = dataclasses.replace(cache, self_k=self_k, self_v=self_v)
        return logits, cache

    # ---- helpers ---------------------------------------------------------------------
    def _final(self, h: jax.Array, norm: Norm | None) -> jax.Array:
        return h if norm is None else layer_norm(h, _values(norm), self.config.layer_norm_eps)

    def _logits(self, h: jax.Array, head: OutMajor | None = None) -> jax.Array:
        """float32 logits of the decoder's last hidden states [B, S, D], its final norm
        first (in a threaded head's `cpu_dots` call when it can take it)."""
        norm, eps = self.dec_final, self.config.layer_norm_eps
        if head is not None and _one_job(head):
            x, weights = _kernel_norm(h, None if norm is None else _values(norm), eps)
            logits = cpu_dots.rows_dot(x.reshape(-1, x.shape[-1]), [head.parts[0]], norm=weights, eps=eps)[0]
            logits = logits.reshape(h.shape[:-1] + (-1,))
        else:
            logits = _dense_f32("bsd,dv->bsv", self._final(h, norm), self.lm_head[...] if head is None else head)
        return constrain(logits, ("act_batch", "act_len", "act_vocab"))

    def _maybe_remat(self, body):
        return jax.checkpoint(body, prevent_cse=False) if self.remat else body

    def _check_text(self, input_ids, attention_mask):
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, T]"
            )
        if input_ids.shape[1] > cfg.text_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the model has text_len={cfg.text_len} "
                "(tokenize with truncation to text_len)"
            )

    # ---- model directories ----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=jnp.float32, mesh=None) -> "DalleBart":
        """Load a released-format model directory (config.json + flax_model.msgpack).

        Weights are cast to `dtype` tensor by tensor while reading (a bf16 load never
        holds an fp32 copy of the model) and computation runs in `dtype`. With `mesh`,
        each tensor is placed sharded as the rule table says.

        Raises:
          CheckpointError: missing/damaged files, or tensors missing, unexpected or
            misshapen (each named with expected and found shapes).
          ConfigError: config.json asks for an option this code does not implement.
        """
        return cls.from_pretrained_tables_on_host(path, dtype, mesh, ())[0]

    @classmethod
    def from_pretrained_text_table_on_host(cls, path: str | Path, dtype=jnp.float32,
                                           mesh=None) -> tuple["DalleBart", np.ndarray]:
        """`from_pretrained`, but the encoder's token table stays in the file.

        Returns (model, table): the model holds an empty [0, D] placeholder for
        `enc_embed.tokens` (so `encode` needs `token_rows=`), and `table` is a read-only
        memory map of the checkpoint's [text_vocab_size, D] tensor, in its stored dtype
        (`host_rows(table, ids, dtype)` gives the rows). Why: a prompt reads 64 of its
        rows, so mapping it keeps the rest out of memory (DALL-E Mini: 206 MB in float32,
        103 MB in bfloat16; Mega twice that). For a pipeline, which owns its model.
        """
        model, tables = cls.from_pretrained_tables_on_host(path, dtype, mesh, (TEXT_TABLE,))
        return model, tables[TEXT_TABLE]

    @classmethod
    def from_pretrained_tables_on_host(cls, path: str | Path, dtype=jnp.float32, mesh=None,
                                       tables: tuple[str, ...] = (TEXT_TABLE, IMAGE_TABLE),
                                       ) -> tuple["DalleBart", dict[str, np.ndarray]]:
        """`from_pretrained`, but the token tables named in `tables` (`TEXT_TABLE`,
        `IMAGE_TABLE`) stay in the file: the model holds empty [0, D] placeholders for
        them, and the second value maps each name to a read-only memory map of its
        checkpoint tensor (see `from_pretrained_text_table_on_host`). The decoder's table
        is then read with `decode_step(token_rows=)`; a decode step reads one of its rows
        per image (DALL-E Mini: 67 MB in float32 of which an image reads 256 rows)."""
        path = ckpt.model_dir(path, "DalleBart model")
        config = DalleBartConfig.load(path / ckpt.CONFIG_NAME)
        names = released_names(config)
        flat = ckpt.read_msgpack(path / ckpt.MSGPACK_NAME, dtype=jnp.dtype(dtype),
                                 mapped=tuple(names[t] for t in tables))
        flat = stack_unscanned(flat, config)
        model = cls.from_released_params(config, flat, dtype=dtype, mesh=mesh, source=str(path / ckpt.MSGPACK_NAME),
                                         on_host=tuple(tables))
        return model, {t: flat.pop(names[t]) for t in tables}

    @classmethod
    def from_released_params(cls, config: DalleBartConfig, flat: dict[str, np.ndarray], dtype=jnp.float32,
                             mesh=None, source: str = "params",
                             on_host: tuple[str, ...] = ()) -> "DalleBart":
        """Build a model from a flat released parameter tree (`{"model/encoder/...": array}`).

        `flat` is consumed: its arrays are moved to the device one by one, except those
        named in `on_host` (our paths, e.g. `TEXT_TABLE`): checked like the rest, then
        left in `flat` for the caller, the model holding an empty [0, ...] placeholder
        in their place (see `encode(token_rows=)`).
        """
        abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
        graphdef, state = nnx.split(abstract)
        names = released_names(config)
        ours_flat = ckpt.flatten(nnx.to_pure_dict(state))
        expected = {names[k]: tuple(v.shape) for k, v in ours_flat.items()}
        ckpt.check_tree(flat, expected, source)
        shardings = None if mesh is None else ckpt.flatten(nnx.to_pure_dict(state_shardings(state, mesh)))
        values = {}
        for ours in on_host:
            shape = (0,) + expected[names[ours]][1:]
            values[ours] = jax.device_put(np.zeros(shape, jnp.dtype(dtype)),
                                          None if shardings is None else shardings[ours])
        for ours, released in names.items():
            if ours in on_host:
                continue
            # pop: each numpy tensor is freed once it is on the device, so the peak is
            # one model copy plus one tensor, not two model copies.
            arr = np.asarray(flat.pop(released))
            if arr.dtype != jnp.dtype(dtype):
                arr = arr.astype(jnp.dtype(dtype))
            values[ours] = jax.device_put(arr, None if shardings is None else shardings[ours])
            # Wait for the copy: device_put is asynchronous, and without this every host
            # tensor stays alive until its queued copy is done, so the device buffers are
            # allocated while all the host ones still exist (mini fp32: 3.54 GB resident
            # once the queue drained, against 1.87 GB; benchmarks/load_memory.py --probe).
            # Waiting frees each host tensor before the next device buffer is allocated,
            # which can then reuse its memory.
            values[ours].block_until_ready()
        nnx.replace_by_pure_dict(state, ckpt.unflatten(values))
        return nnx.merge(graphdef, state)

    def released_params(self) -> dict[str, np.ndarray]:
        """The flat released parameter tree of this model, as numpy arrays."""
        ours = ckpt.flatten(nnx.to_pure_dict(nnx.state(self, nnx.Param)))
        names = released_names(self.config)
        return {names[k]: np.asarray(jax.device_get(v)) for k, v in ours.items()}

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Write config.json + flax_model.msgpack (released format), plus tokenizer files if given."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / ckpt.CONFIG_NAME)
        ckpt.write_msgpack(path / ckpt.MSGPACK_NAME, self.released_params())
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------------------
# The released parameter tree
# --------------------------------------------------------------------------------------


def released_names(cfg: DalleBartConfig) -> dict[str, str]:
    """Map each of our flat param paths to its path in the released (scanned) tree.

    Flax compact modules are auto-named in creation order, so a LayerNorm's released
    name depends on which norms exist (normformer vs preln): count them.
    """
    names: dict[str, str] = {"lm_head": "lm_head/kernel"}
    for side, stack in (("enc", "encoder"), ("dec", "decoder")):
        root = f"model/{stack}"
        names[f"{side}_embed/tokens"] = f"{root}/embed_tokens/embedding"
        names[f"{side}_embed/positions"] = f"{root}/embed_positions/embedding"
        if side == "dec" and cfg.image_pos_2d:  # our extension; not in released trees
            names["dec_embed/rows"] = f"{root}/embed_rows/embedding"
            names["dec_embed/cols"] = f"{root}/embed_cols/embedding"
        names[f"{side}_embed/norm/scale"] = f"{root}/layernorm_embedding/scale"
        names[f"{side}_embed/norm/bias"] = f"{root}/layernorm_embedding/bias"
        if cfg.use_final_ln:
            names[f"{side}_final/bias"] = f"{root}/final_ln/bias"
        layer = f"{root}/layers/FlaxBart{'Encoder' if side == 'enc' else 'Decoder'}Layers"
        post = cfg.ln_positions == "normformer"
        n_ln = 0
        attns = [("self", "FlaxBartAttention_0")] + ([("cross", "FlaxBartAttention_1")] if side == "dec" else [])
        for kind, attn_name in attns:
            names[f"{side}_layers/{kind}_pre/bias"] = f"{layer}/LayerNorm_{n_ln}/bias"
            n_ln += 1
            for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                names[f"{side}_layers/{kind}_attn/{ours}"] = f"{layer}/{attn_name}/{theirs}/kernel"
            if post:
                names[f"{side}_layers/{kind}_post/scale"] = f"{layer}/LayerNorm_{n_ln}/scale"
                names[f"{side}_layers/{kind}_post/bias"] = f"{layer}/LayerNorm_{n_ln}/bias"
                n_ln += 1
        mlp = f"{layer}/{'GLU_0' if cfg.use_glu else 'FFN_0'}"
        names[f"{side}_layers/mlp/pre/bias"] = f"{mlp}/LayerNorm_0/bias"
        names[f"{side}_layers/mlp/wi_gate"] = f"{mlp}/Dense_0/kernel"
        if cfg.use_glu:
            names[f"{side}_layers/mlp/wi_value"] = f"{mlp}/Dense_1/kernel"
            names[f"{side}_layers/mlp/wo"] = f"{mlp}/Dense_2/kernel"
        else:
            names[f"{side}_layers/mlp/wo"] = f"{mlp}/Dense_1/kernel"
        if post:
            names[f"{side}_layers/mlp/mid/bias"] = f"{mlp}/LayerNorm_1/bias"
    return names


def stack_unscanned(flat: dict[str, np.ndarray], cfg: DalleBartConfig) -> dict[str, np.ndarray]:
    """Accept the unscanned layout (`FlaxBartEncoderLayer_{i}/...`, from `DalleBart.unscan`).

    Stacks per-layer tensors into the scanned `FlaxBartEncoderLayers/...` [L, ...] form.
    A scanned tree is returned unchanged.
    """
    out: dict[str, np.ndarray] = {}
    groups: dict[str, dict[int, np.ndarray]] = {}
    for key, v in flat.items():
        parts = key.split("/")
        for j, part in enumerate(parts):
            for kind in ("Encoder", "Decoder"):
                prefix = f"FlaxBart{kind}Layer_"
                if part.startswith(prefix) and part[len(prefix):].isdigit():
                    scanned = "/".join(parts[:j] + [f"FlaxBart{kind}Layers"] + parts[j + 1:])
                    groups.setdefault(scanned, {})[int(part[len(prefix):])] = v
                    break
            else:
                continue
            break
        else:
            out[key] = v
    for key, per_layer in groups.items():
        n = len(per_layer)
        if sorted(per_layer) != list(range(n)):
            raise ckpt.CheckpointError(f"unscanned checkpoint has layers {sorted(per_layer)} for {key}")
        out[key] = np.stack([per_layer[i] for i in range(n)])
    return out


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))

