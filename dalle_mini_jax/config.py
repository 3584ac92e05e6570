"""Frozen dataclass configs for the transformer and the VQGAN, with named presets.

Both configs read and write the `config.json` keys of the released checkpoints
(DALL·E Mini / Mega: `DalleBartConfig`; VQGAN: vqgan-jax `VQGANConfig`), so a
released model directory loads unchanged and what we save loads in their code.

An option of the released code that we do not implement (swin position bias,
sinkhorn > 1, ALiBi, ...) is refused with a `ConfigError` naming it: silently
ignoring it would give a model that computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json holds a key or value that this code cannot honour."""


# --------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    """Shape and options of the DalleBart text encoder + image-token decoder.

    Shape letters used across the code: B batch, T text length, S image length,
    D embed, H heads, K head dim, F mlp, V vocab, L layers.
    """

    embed_dim: int = 1024  # D, width of both stacks (released key: d_model)
    num_heads: int = 16  # H, attention heads in every attention (K = D / H)
    mlp_dim: int = 2730  # F, inner width of the GLU (2/3 of 4096 for mini)
    num_encoder_layers: int = 12  # L of the text encoder
    num_decoder_layers: int = 12  # L of the image decoder
    text_vocab_size: int = 50264  # rows of the encoder token table (BPE vocab, may be padded)
    image_vocab_size: int = 16384  # VQGAN codes; decoder vocab = image_vocab_size + 1 (BOS)
    text_len: int = 64  # T, prompt tokens (learned positions)
    image_len: int = 256  # S, image tokens (learned positions, raster order)
    ln_positions: str = "normformer"  # "normformer" (released) or "preln"
    use_glu: bool = True  # GLU feed-forward (released) rather than a plain 2-layer FFN
    activation: str = "gelu"  # exact erf GELU, as HF's ACT2FN["gelu"]
    init_std: float = 0.02  # normal init std of every kernel and embedding
    layer_norm_eps: float = 1e-5  # every DalleBart LayerNorm
    use_final_ln: bool = True  # bias-only LayerNorm after each stack
    normalize_text: bool = True  # run the TextNormalizer on prompts before BPE
    text_pad_token_id: int = 1  # BART <pad>
    text_bos_token_id: int = 0  # BART <s>
    text_eos_token_id: int = 2  # BART </s>
    # Decoder BOS id. None = image_vocab_size. Mega pads its tables to 16415 (+1) rows for
    # sharding but still starts from 16384; ids >= this are never real VQGAN codes.
    decoder_start_token_id: int | None = None
    # Names the VQGAN this transformer was trained with: a path relative to the model
    # directory, or absolute. Not a released key (they pass the VQGAN separately).
    vqgan_path: str | None = None
    # Decoder only: learned row and column tables [g, D] (g = sqrt(image_len)) added to the
    # position table, so a small model learns "row 0" once, not once per cell, and position
    # words have a direct handle. Our extension (config key `image_position_2d`); the
    # released checkpoints have none.
    image_pos_2d: bool = False

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if not 0 < self.bos_token_id <= self.image_vocab_size:
            raise ConfigError(
                f"decoder_start_token_id={self.decoder_start_token_id} must lie in "
                f"1..image_vocab_size={self.image_vocab_size}"
            )
        if self.ln_positions not in ("normformer", "preln"):
            raise ConfigError(
                f"ln_positions={self.ln_positions!r} is not implemented; use 'normformer' "
                "(the released checkpoints) or 'preln'"
            )
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation!r} is not implemented; "
                f"choose one of {sorted(_ACTIVATIONS)}"
            )
        if self.image_pos_2d and self.image_grid ** 2 != self.image_len:
            raise ConfigError(
                f"image_position_2d needs a square token grid; image_len={self.image_len} is "
                "not a square"
            )
        for name in ("embed_dim", "num_heads", "mlp_dim", "num_encoder_layers",
                     "num_decoder_layers", "text_vocab_size", "image_vocab_size",
                     "text_len", "image_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    # ---- derived --------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """K: width of one attention head."""
        return self.embed_dim // self.num_heads

    @property
    def image_grid(self) -> int:
        """Tokens per row of the (square) image token grid."""
        return math.isqrt(self.image_len)

    @property
    def decoder_vocab_size(self) -> int:
        """Rows of the decoder token table and columns of lm_head: codes + BOS."""
        return self.image_vocab_size + 1

    @property
    def bos_token_id(self) -> int:
        """Decoder start token (released decoder_start_token_id)."""
        if self.decoder_start_token_id is None:
            return self.image_vocab_size
        return self.decoder_start_token_id

    @property
    def num_image_codes(self) -> int:
        """Ids 0 .. num_image_codes-1 are VQGAN codes; BOS and padding ids lie above."""
        return self.bos_token_id

    def replace(self, **changes) -> "DalleBartConfig":
        return dataclasses.replace(self, **changes)

    # ---- released config.json -------------------------------------------------------
    def to_released_dict(self) -> dict[str, Any]:
        """The released `DalleBartConfig` keys, so the original code can load what we save."""
        d = {
            "architectures": ["eBart"],
            "model_type": "dallebart",
            "d_model": self.embed_dim,
            "encoder_attention_heads": self.num_heads,
            "decoder_attention_heads": self.num_heads,
            "encoder_ffn_dim": self.mlp_dim,
            "decoder_ffn_dim": self.mlp_dim,
            "encoder_layers": self.num_encoder_layers,
            "decoder_layers": self.num_decoder_layers,
            "encoder_vocab_size": self.text_vocab_size,
            "image_vocab_size": self.image_vocab_size,
            "max_text_length": self.text_len,
            "image_length": self.image_len,
            "ln_positions": self.ln_positions,
            "ln_type": "layernorm",
            "use_glu": self.use_glu,
            "activation_function": self.activation,
            "init_std": self.init_std,
            "use_final_ln_encoder": self.use_final_ln,
            "use_final_ln_decoder": self.use_final_ln,
            "normalize_text": self.normalize_text,
            # The released configs put pad/bos/eos one past the decoder start id (16385 for
            # mini *and* mega), not one past image_vocab_size (which would be 16416 for mega).
            "pad_token_id": self.bos_token_id + 1,
            "bos_token_id": self.bos_token_id + 1,
            "eos_token_id": self.bos_token_id + 1,
            "decoder_start_token_id": self.bos_token_id,
            "forced_eos_token_id": None,
            "min_length": self.image_len + 1,
            "max_length": self.image_len + 1,
            "is_encoder_decoder": True,
            "tie_word_embeddings": False,
            "scale_embedding": False,
            "use_bias": False,
            "use_head_scale": False,
            "use_cosine_attention": False,
            "use_absolute_position_embeddings": True,
            "use_swin_position_embeddings": False,
            "use_deepnet_scaling": False,
            "use_subln_init": False,
            "use_alibi": False,
            "sinkhorn_iters": 1,
            "force_ln_scale": False,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0,
            "decoder_layerdrop": 0.0,
            "use_scan": True,
            "use_cache": True,
            "gradient_checkpointing": True,
        }
        if self.vqgan_path is not None:
            d["vqgan_path"] = self.vqgan_path
        if self.image_pos_2d:  # written only when set: released readers never see it
            d["image_position_2d"] = True
        return d

    @classmethod
    def from_released_dict(cls, d: dict[str, Any]) -> "DalleBartConfig":
        """Parse a released `config.json` dict, refusing options we do not implement."""
        d = dict(d)
        _check_model_type(d, ("dallebart",), "DalleBart")
        _refuse_unsupported(d, _DALLEBART_REQUIRED)
        # Both stacks must agree where our config has one field for both.
        for enc, dec, ours in (
            ("encoder_attention_heads", "decoder_attention_heads", "num_heads"),
            ("encoder_ffn_dim", "decoder_ffn_dim", "mlp_dim"),
            ("use_final_ln_encoder", "use_final_ln_decoder", "use_final_ln"),
        ):
            if enc in d and dec in d and d[enc] != d[dec]:
                raise ConfigError(
                    f"{enc}={d[enc]} differs from {dec}={d[dec]}; this implementation uses one "
                    f"{ours} for both stacks"
                )
        image_vocab = d.pop("image_vocab_size", cls.image_vocab_size)
        start = d.pop("decoder_start_token_id", None)
        kwargs = dict(
            embed_dim=d.pop("d_model", cls.embed_dim),
            num_heads=d.pop("encoder_attention_heads", cls.num_heads),
            mlp_dim=d.pop("encoder_ffn_dim", cls.mlp_dim),
            num_encoder_layers=d.pop("encoder_layers", cls.num_encoder_layers),
            num_decoder_layers=d.pop("decoder_layers", cls.num_decoder_layers),
            text_vocab_size=d.pop("encoder_vocab_size", cls.text_vocab_size),
            image_vocab_size=image_vocab,
            text_len=d.pop("max_text_length", cls.text_len),
            image_len=d.pop("image_length", cls.image_len),
            ln_positions=d.pop("ln_positions", cls.ln_positions),
            use_glu=d.pop("use_glu", cls.use_glu),
            activation=d.pop("activation_function", cls.activation),
            init_std=d.pop("init_std", cls.init_std),
            use_final_ln=d.pop("use_final_ln_encoder", cls.use_final_ln),
            normalize_text=d.pop("normalize_text", cls.normalize_text),
            vqgan_path=d.pop("vqgan_path", None),
            image_pos_2d=bool(d.pop("image_position_2d", False)),
            decoder_start_token_id=None if start in (None, image_vocab) else start,
        )
        for k in ("decoder_attention_heads", "decoder_ffn_dim", "use_final_ln_decoder"):
            d.pop(k, None)
        _warn_unknown(d, _DALLEBART_IGNORED, "DalleBart")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_released_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DalleBartConfig":
        return cls.from_released_dict(_read_json(path))


_ACTIVATIONS = {"gelu", "gelu_new", "relu", "swish", "silu"}

# Released options this code does not implement, with the only value it accepts.
# (key, accepted value, why it matters) — anything else is refused, never ignored.
_DALLEBART_REQUIRED: dict[str, tuple[Any, str]] = {
    "use_bias": (False, "dense biases"),
    "use_head_scale": (False, "NormFormer head scale"),
    "use_cosine_attention": (False, "Swin v2 cosine attention"),
    "use_absolute_position_embeddings": (True, "learned absolute positions are required"),
    "use_swin_position_embeddings": (False, "Swin relative position bias"),
    "use_deepnet_scaling": (False, "DeepNet residual scaling"),
    "use_subln_init": (False, "sub-LN initialisation"),
    "use_alibi": (False, "ALiBi"),
    "sinkhorn_iters": (1, "Sinkhorn attention"),
    "force_ln_scale": (False, "scale params on bias-only norms"),
    "scale_embedding": (False, "sqrt(d_model) embedding scale"),
    "tie_word_embeddings": (False, "tied embeddings"),
    "ln_type": ("layernorm", "RMSNorm"),
}

# Keys of the released config (or HF PretrainedConfig) that carry no model maths here.
_DALLEBART_IGNORED = {
    "architectures", "model_type", "transformers_version", "dropout", "attention_dropout",
    "activation_dropout", "encoder_layerdrop", "decoder_layerdrop", "use_scan", "use_cache",
    "gradient_checkpointing", "is_encoder_decoder", "pad_token_id", "bos_token_id",
    "eos_token_id", "forced_eos_token_id", "min_length", "max_length", "tau_init",
    "num_labels", "id2label", "label2id", "torch_dtype", "dtype", "vocab_size", "top_k",
    "top_p", "temperature", "do_sample", "num_beams", "classifier_dropout", "init_std_scale",
}


# --------------------------------------------------------------------------------------
# VQGAN
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Shape of the taming-transformers VQGAN (vqgan-jax layout).

    The image side is `resolution`; the token grid side is resolution / 2**(len(channel_mult)-1).
    """

    channels: int = 128  # base conv width (released key: ch)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per resolution level
    num_res_blocks: int = 2  # ResNet blocks per level (decoder has one more)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sides that get self-attention
    z_channels: int = 256  # encoder output / decoder input width
    embed_dim: int = 256  # codebook vector width
    codebook_size: int = 16384  # number of codes (released key: n_embed)
    resolution: int = 256  # image side in pixels
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-6  # GroupNorm epsilon (min-dalle uses torch's 1e-5: see tests)
    # Token-local codes (not a taming option; config.json key "local", written only when
    # set): the encoder's norms keep their affine map but take no image statistics, and
    # the encoder is 1x1 below full resolution with no mid attention, so a code depends
    # only on its own patch and a few pixels around it. vqgan.py says why.
    local: bool = False
    # Patch codes (ours too; key "patch_codes", written only when set; needs `local`): the
    # encoder's every convolution is 1x1 and it downsamples by non-overlapping 2x2 stride-2
    # convolutions, so a code is a function of its own f x f patch and of nothing else;
    # the decoder upsamples by depth to space (a 1x1 conv to 4x the width), so each of a
    # position's 2x2 children has its own map (vqgan.Upsample says why).
    # The local encoder's 3x3 stride-2 convolutions see 2(f - 1) + 3 pixels past a patch:
    # at f32 that is a whole neighbouring patch. vqgan.py says where it matters.
    patch_codes: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"resolution={self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} of channel_mult={self.channel_mult}"
            )
        if self.local and self.attn_resolutions:
            raise ConfigError(
                f"local=True with attn_resolutions={self.attn_resolutions}: attention in the "
                "encoder would mix every position into every code; use attn_resolutions=()"
            )
        if self.patch_codes and not self.local:
            raise ConfigError("patch_codes=True needs local=True (patch codes are a stricter "
                              "kind of local codes)")
        for c in [self.channels * m for m in self.channel_mult] + [self.channels]:
            if c % self.norm_groups:
                raise ConfigError(
                    f"a level width {c} is not divisible by norm_groups={self.norm_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the token grid: tokens per image = grid_size**2."""
        return self.resolution // self.downsample_factor

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def replace(self, **changes) -> "VQGANConfig":
        return dataclasses.replace(self, **changes)

    def to_released_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["VQModel"],
            "model_type": "vqgan",
            "ch": self.channels,
            "ch_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions),
            "z_channels": self.z_channels,
            "embed_dim": self.embed_dim,
            "n_embed": self.codebook_size,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "out_ch": self.out_channels,
            "double_z": False,
            "dropout": 0.0,
            "resamp_with_conv": True,
            "give_pre_end": False,
            "norm_groups": self.norm_groups,
            "norm_eps": self.norm_eps,
            **({"local": True} if self.local else {}),
            **({"patch_codes": True} if self.patch_codes else {}),
        }

    @classmethod
    def from_released_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        d = dict(d)
        _check_model_type(d, ("vqgan",), "VQGAN")
        _refuse_unsupported(d, _VQGAN_REQUIRED)
        kwargs = dict(
            channels=d.pop("ch", cls.channels),
            channel_mult=tuple(d.pop("ch_mult", cls.channel_mult)),
            num_res_blocks=d.pop("num_res_blocks", cls.num_res_blocks),
            attn_resolutions=tuple(d.pop("attn_resolutions", cls.attn_resolutions)),
            z_channels=d.pop("z_channels", cls.z_channels),
            embed_dim=d.pop("embed_dim", cls.embed_dim),
            codebook_size=d.pop("n_embed", cls.codebook_size),
            resolution=d.pop("resolution", cls.resolution),
            in_channels=d.pop("in_channels", cls.in_channels),
            out_channels=d.pop("out_ch", cls.out_channels),
            norm_groups=d.pop("norm_groups", cls.norm_groups),
            norm_eps=d.pop("norm_eps", cls.norm_eps),
            local=bool(d.pop("local", cls.local)),
            patch_codes=bool(d.pop("patch_codes", cls.patch_codes)),
        )
        _warn_unknown(d, _VQGAN_IGNORED, "VQGAN")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_released_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VQGANConfig":
        return cls.from_released_dict(_read_json(path))


_VQGAN_REQUIRED: dict[str, tuple[Any, str]] = {
    "double_z": (False, "a doubled (KL) latent"),
    "resamp_with_conv": (True, "resampling without convolutions"),
    "give_pre_end": (False, "returning the decoder's pre-output features"),
}
_VQGAN_IGNORED = {
    "architectures", "model_type", "transformers_version", "dropout", "torch_dtype", "dtype",
    "_name_or_path",
}


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------

TRANSFORMER_PRESETS: dict[str, DalleBartConfig] = {
    # For tests: every code path, milliseconds per call.
    "tiny": DalleBartConfig(
        embed_dim=64, num_heads=4, mlp_dim=96, num_encoder_layers=2, num_decoder_layers=2,
        text_vocab_size=512, image_vocab_size=64, text_len=16, image_len=16, init_std=0.02,
    ),
    # The bundled model's shape: 64x64 shapes images, f8 VQGAN -> 8x8 = 64 tokens.
    "shapes": DalleBartConfig(
        embed_dim=256, num_heads=4, mlp_dim=512, num_encoder_layers=3, num_decoder_layers=4,
        text_vocab_size=1024, image_vocab_size=1024, text_len=32, image_len=64, init_std=0.02,
    ),
    # The released DALL·E Mini (dalle-mini/dalle-mini) and Mega (dalle-mini/dalle-mega).
    "mini": DalleBartConfig(),
    "mega": DalleBartConfig(
        embed_dim=2048, num_heads=32, mlp_dim=4096, num_encoder_layers=24, num_decoder_layers=24,
        text_vocab_size=50272, image_vocab_size=16415, decoder_start_token_id=16384,
        init_std=0.01,
    ),
}

VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # For tests: f4, 16x16 images -> 4x4 tokens.
    "tiny": VQGANConfig(
        channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
        z_channels=32, embed_dim=16, codebook_size=32, resolution=16, norm_groups=8,
    ),
    # shapes: 64x64 images, f8 -> 8x8 tokens, 1,024 codes of 16 dims. Narrow at 64x64 and
    # 32x32, where a CPU spends almost all of its time (widths 8, 16, 32, 64): 0.77M
    # params, 3 MB in fp32. 1,024 codes, not 256: an 8x8 patch holds a piece of a shape in
    # one of 8 colours at one of many offsets, and with 256 codes colours were merged
    # (judge acceptance 77 % vs 86 % in equal 20-minute runs; training/configs/vqgan_shapes.py).
    "shapes": VQGANConfig(
        channels=8, channel_mult=(1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(),
        z_channels=64, embed_dim=16, codebook_size=1024, resolution=64, norm_groups=8,
    ),
    # The released f16 / 16384 ImageNet VQGAN (dalle-mini/vqgan_imagenet_f16_16384).
    "f16_16384": VQGANConfig(),
}
VQGAN_PRESETS["mini"] = VQGAN_PRESETS["mega"] = VQGAN_PRESETS["f16_16384"]


def transformer_preset(name: str) -> DalleBartConfig:
    try:
        return TRANSFORMER_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown transformer preset {name!r}; choose one of {sorted(TRANSFORMER_PRESETS)}"
        ) from None


def vqgan_preset(name: str) -> VQGANConfig:
    try:
        return VQGAN_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown VQGAN preset {name!r}; choose one of {sorted(VQGAN_PRESETS)}"
        ) from None


# --------------------------------------------------------------------------------------
# helpers shared by both configs
# --------------------------------------------------------------------------------------


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: a model directory needs a config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-export the file") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(d).__name__}")
    return d


def _check_model_type(d: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    mt = d.pop("model_type", None)
    if mt is not None and mt not in allowed:
        raise ConfigError(
            f"config.json has model_type={mt!r} but a {what} config needs one of {allowed}: "
            "is this the right directory?"
        )


def _refuse_unsupported(d: dict[str, Any], required: dict[str, tuple[Any, str]]) -> None:
    for key, (accepted, what) in required.items():
        if key in d:
            value = d.pop(key)
            if value != accepted:
                raise ConfigError(
                    f"config.json sets {key}={value!r} ({what}), which dalle_mini_jax does not "
                    f"implement; only {key}={accepted!r} is supported"
                )


def _warn_unknown(d: dict[str, Any], ignored: set[str], what: str) -> None:
    unknown = sorted(k for k in d if k not in ignored and not k.startswith("_"))
    if unknown:
        warnings.warn(
            f"{what} config.json keys not used by dalle_mini_jax: {', '.join(unknown)}",
            stacklevel=3,
        )
