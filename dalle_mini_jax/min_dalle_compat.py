"""min-dalle on our weights: released-format trees as min-dalle's PyTorch modules.

min-dalle (kuprel/min-dalle) is an independent PyTorch implementation of DALL·E Mini /
Mega. Two places run its own code on the same weights as ours: the conformance tests
(`tests/test_transformer_min_dalle.py`, `tests/test_vqgan_min_dalle.py`) and the speed
benchmark (`benchmarks/generate.py`). This module is the one mapping they share, from
the flat released tree (`checkpoint.read_msgpack` of a model directory) to min-dalle's
state dicts, following min-dalle's own converters:

* DalleBart (reference `dalle-mini-checkpoints.md` §2.3): layers unstacked, Flax
  (in, out) kernels transposed to torch's (out, in), `scale` / `embedding` renamed to
  `weight`, `lm_head` into the decoder. Bias-only LayerNorms have no weight in the
  tree, so min-dalle loads with `strict=False`; `load_non_strict` does the same but
  checks that those weights are the only keys missing.
* VQGAN (§2.4): decoder half only, `_` -> `.` under up/down, HWIO -> OIHW kernels.

Everything is float32: min-dalle's fp16 files are its own conversion, not our format.

torch and min_dalle are imported inside the functions: they are test and benchmark
dependencies, not the package's. Importing min_dalle also turns torch's autograd off
and sets its thread count to every CPU for the whole process; a caller that cares
(the tests) imports it first and restores both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .config import DalleBartConfig


class MappingError(ValueError):
    """A released tensor the mapping does not know, or a state-dict key mismatch."""


# Per-layer released names (under .../FlaxBart{Encoder,Decoder}Layers/) -> torch names
# (under layers.{l}.), and whether the Flax (in, out) kernel becomes torch's (out, in).
_LAYER_MAP = {
    "LayerNorm_0/bias": ("pre_self_attn_layer_norm.bias", False),
    "LayerNorm_1/scale": ("self_attn_layer_norm.weight", False),
    "LayerNorm_1/bias": ("self_attn_layer_norm.bias", False),
    "LayerNorm_2/bias": ("pre_encoder_attn_layer_norm.bias", False),
    "LayerNorm_3/scale": ("encoder_attn_layer_norm.weight", False),
    "LayerNorm_3/bias": ("encoder_attn_layer_norm.bias", False),
    "GLU_0/LayerNorm_0/bias": ("glu.ln0.bias", False),
    "GLU_0/LayerNorm_1/bias": ("glu.ln1.bias", False),
    "GLU_0/Dense_0/kernel": ("glu.fc0.weight", True),
    "GLU_0/Dense_1/kernel": ("glu.fc1.weight", True),
    "GLU_0/Dense_2/kernel": ("glu.fc2.weight", True),
}
for _attn, _torch in (("FlaxBartAttention_0", "self_attn"), ("FlaxBartAttention_1", "encoder_attn")):
    for _p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _LAYER_MAP[f"{_attn}/{_p}/kernel"] = (f"{_torch}.{_p}.weight", True)
del _attn, _torch, _p

_TOP_MAP = {
    "embed_tokens/embedding": "embed_tokens.weight",
    "embed_positions/embedding": "embed_positions.weight",
    "layernorm_embedding/scale": "layernorm_embedding.weight",
    "layernorm_embedding/bias": "layernorm_embedding.bias",
    "final_ln/bias": "final_ln.bias",
}


def _tensor(x: np.ndarray, transpose: bool = False) -> "torch.Tensor":
    import torch

    x = np.asarray(x, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.T if transpose else x))


def dallebart_state_dict(flat: dict[str, np.ndarray], stack: str) -> dict[str, "torch.Tensor"]:
    """min-dalle's `encoder.pt` / `decoder.pt` state dict from the flat released tree.

    Args:
      flat: `{"model/encoder/...": array}` as `read_msgpack` returns it; layer tensors
        stacked [L, ...]. The tensors of `stack` (and `lm_head/kernel` for the decoder)
        are popped as they are converted, so a large model is not held twice.
      stack: "encoder" or "decoder".

    Returns:
      `{"layers.{l}.self_attn.q_proj.weight": (D, D) tensor, ...}`, float32.

    Raises:
      MappingError: a tensor of the stack, or at the top level, that the mapping does
        not know (it would otherwise be dropped silently).
    """
    root = f"model/{stack}/"
    layers = f"{root}layers/FlaxBart{stack.capitalize()}Layers/"
    strays = [k for k in flat if not k.startswith("model/") and k != "lm_head/kernel"]
    if strays:
        raise MappingError(f"unmapped tensors {strays}")
    sd = {}
    for key in [k for k in flat if k.startswith(root)]:
        if key.startswith(layers) and key[len(layers):] in _LAYER_MAP:
            name, transpose = _LAYER_MAP[key[len(layers):]]
            for l, v in enumerate(flat.pop(key)):
                sd[f"layers.{l}.{name}"] = _tensor(v, transpose)
        elif key[len(root):] in _TOP_MAP:
            sd[_TOP_MAP[key[len(root):]]] = _tensor(flat.pop(key))
        else:
            raise MappingError(f"unmapped tensor {key}")
    if stack == "decoder":
        sd["lm_head.weight"] = _tensor(flat.pop("lm_head/kernel"), transpose=True)
    return sd


def bias_only_norms(stack: str, num_layers: int) -> set[str]:
    """Module names of the stack's LayerNorms that have a bias and no scale."""
    per_layer = ["pre_self_attn_layer_norm", "glu.ln0", "glu.ln1"]
    if stack == "decoder":
        per_layer.append("pre_encoder_attn_layer_norm")
    return {"final_ln"} | {f"layers.{l}.{n}" for l in range(num_layers) for n in per_layer}


def load_non_strict(module: "torch.nn.Module", sd: dict, bias_only: set[str]) -> None:
    """`load_state_dict(strict=False)` as min-dalle does, but with every mismatch checked.

    Raises:
      MappingError: a key of `sd` the module lacks or has in another shape, a missing
        key other than the weights of `bias_only`, or one of those weights not at its
        default 1 (a bias-only norm has a fixed unit scale).
    """
    import torch

    own = module.state_dict()
    wrong = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise MappingError(f"keys the module lacks or has in another shape: {wrong}")
    result = module.load_state_dict(sd, strict=False)
    expected = {f"{n}.weight" for n in bias_only}
    if result.unexpected_keys or set(result.missing_keys) != expected:
        raise MappingError(f"missing {sorted(set(result.missing_keys) ^ expected)} (symmetric difference "
                           f"with the bias-only norms), unexpected {result.unexpected_keys}")
    own = module.state_dict()
    not_one = [n for n in bias_only if not torch.equal(own[f"{n}.weight"], torch.ones_like(own[f"{n}.weight"]))]
    if not_one:
        raise MappingError(f"bias-only norms whose weight is not 1: {not_one}")


def dallebart_modules(config: "DalleBartConfig", flat: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """min-dalle's `DalleBartEncoder` and `DalleBartDecoder` (fp32, CPU, eval) on `flat`.

    The modules are built at `config`'s sizes; min-dalle hard-codes 256 image positions
    and an encoder batch of 2, so only configs with `image_len == 256` fit. `flat` is
    consumed (see `dallebart_state_dict`).

    Raises:
      MappingError: see `dallebart_state_dict` and `load_non_strict`.
    """
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder

    encoder = DalleBartEncoder(
        layer_count=config.num_encoder_layers, embed_count=config.embed_dim,
        attention_head_count=config.num_heads, text_vocab_count=config.text_vocab_size,
        text_token_count=config.text_len, glu_embed_count=config.mlp_dim, device="cpu",
    ).eval()
    load_non_strict(encoder, dallebart_state_dict(flat, "encoder"),
                    bias_only_norms("encoder", config.num_encoder_layers))
    decoder = DalleBartDecoder(
        image_vocab_count=config.image_vocab_size, embed_count=config.embed_dim,
        attention_head_count=config.num_heads, glu_embed_count=config.mlp_dim,
        layer_count=config.num_decoder_layers, device="cpu",
    ).eval()
    load_non_strict(decoder, dallebart_state_dict(flat, "decoder"),
                    bias_only_norms("decoder", config.num_decoder_layers))
    return encoder, decoder


def vqgan_detokenizer_state_dict(flat: dict[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
    """Released flat VQGAN tree -> min-dalle `VQGanDetokenizer` state dict (§2.4).

    Decoder side only (encoder and quant_conv are dropped). In keys under up/down,
    `_` becomes `.` (`up_4/block_0` -> `up.4.block.0`) except inside `proj_out` and
    `nin_shortcut`; conv kernels HWIO -> OIHW; GroupNorm `scale` -> `weight`; the
    codebook `quantize/embedding/embedding` (16384, 256) -> `embedding.weight`. Load
    it with `strict=True`: the detokenizer has no parameter outside the tree.
    """
    sd = {}
    for name, value in flat.items():
        if name.startswith(("encoder/", "quant_conv/")):
            continue
        if name == "quantize/embedding/embedding":
            sd["embedding.weight"] = _tensor(value)
            continue
        key = name.replace("/", ".")
        if "up" in key or "down" in key:
            key = key.replace("_", ".")
            key = key.replace("proj.out", "proj_out").replace("nin.shortcut", "nin_shortcut")
        if key.endswith(".kernel"):
            key = key[: -len("kernel")] + "weight"
            value = np.asarray(value).transpose(3, 2, 0, 1)
        elif key.endswith(".scale"):
            key = key[: -len("scale")] + "weight"
        sd[key] = _tensor(value)
    return sd


def build_min_dalle(model_dir: str | Path) -> Any:
    """A `min_dalle.MinDalle` on a released-format model directory: no download, fp32, CPU.

    `MinDalle.__init__` downloads kuprel's converted files, so the instance is made with
    `object.__new__` and given the attributes `generate_images` reads, the sizes from
    the directory's config, its tokenizer files, and the weights mapped here. min-dalle
    is left as it is otherwise (its GroupNorm eps of 1e-5, its start token 16383): this
    is min-dalle's own generation path, for timing it.

    Raises:
      MappingError: see `dallebart_modules`; the VQGAN is loaded strictly.
    """
    import torch
    from min_dalle import MinDalle
    from min_dalle.models import VQGanDetokenizer
    from min_dalle.text_tokenizer import TextTokenizer

    from .checkpoint import CONFIG_NAME, MSGPACK_NAME, read_msgpack
    from .config import DalleBartConfig
    from .pipeline import resolve_vqgan_dir

    model_dir = Path(model_dir)
    cfg = DalleBartConfig.load(model_dir / CONFIG_NAME)
    md = object.__new__(MinDalle)
    md.device, md.is_mega, md.is_reusable, md.dtype, md.is_verbose = "cpu", False, True, torch.float32, False
    md.text_token_count = cfg.text_len
    md.layer_count = cfg.num_decoder_layers
    md.attention_head_count = cfg.num_heads
    md.embed_count = cfg.embed_dim
    md.glu_embed_count = cfg.mlp_dim
    md.text_vocab_count = cfg.text_vocab_size
    md.image_vocab_count = cfg.image_vocab_size
    vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf8"))
    # min-dalle's own reading of merges.txt: drop the version header and the last newline.
    merges = (model_dir / "merges.txt").read_text(encoding="utf8").split("\n")[1:-1]
    md.tokenizer = TextTokenizer(vocab, merges)
    flat = read_msgpack(model_dir / MSGPACK_NAME, dtype="float32")
    md.encoder, md.decoder = dallebart_modules(cfg, flat)
    del flat
    md.detokenizer = VQGanDetokenizer().eval()
    vq_dir = resolve_vqgan_dir(model_dir, cfg, None)
    md.detokenizer.load_state_dict(vqgan_detokenizer_state_dict(read_msgpack(vq_dir / MSGPACK_NAME)), strict=True)
    return md


__all__ = ["MappingError", "bias_only_norms", "build_min_dalle", "dallebart_modules", "dallebart_state_dict",
           "load_non_strict", "vqgan_detokenizer_state_dict"]
