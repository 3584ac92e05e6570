"""Configs: presets, the released config.json keys in and out, and refusals.

The released values below are copied from the reference (dalle-mini-checkpoints.md
§1.6 for DalleBart, §2.4 for the VQGAN), not from our presets, so a preset that drifts
from the released checkpoints fails here.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from dalle_mini_jax.config import (
    TRANSFORMER_PRESETS,
    VQGAN_PRESETS,
    ConfigError,
    DalleBartConfig,
    VQGANConfig,
    transformer_preset,
    vqgan_preset,
)

# The config.json keys of the released checkpoints (reference §1.6), as the hub has them.
RELEASED_COMMON = {
    "architectures": ["eBart"],
    "model_type": "dallebart",
    "transformers_version": "4.19.0.dev0",
    "max_text_length": 64,
    "image_length": 256,
    "min_length": 257,
    "max_length": 257,
    "ln_positions": "normformer",
    "ln_type": "layernorm",
    "force_ln_scale": False,
    "use_glu": True,
    "use_bias": False,
    "use_head_scale": False,
    "use_final_ln_encoder": True,
    "use_final_ln_decoder": True,
    "use_cosine_attention": False,
    "use_swin_position_embeddings": False,
    "use_deepnet_scaling": False,
    "use_alibi": False,
    "sinkhorn_iters": 1,
    "tau_init": 0.05,
    "scale_embedding": False,
    "tie_word_embeddings": False,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "decoder_start_token_id": 16384,
    "bos_token_id": 16385,
    "eos_token_id": 16385,
    "pad_token_id": 16385,
    "gradient_checkpointing": True,
    "use_scan": True,
    "use_cache": True,
    "is_encoder_decoder": True,
    "normalize_text": True,
}
RELEASED_MINI = {
    **RELEASED_COMMON,
    "d_model": 1024,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_ffn_dim": 2730,
    "decoder_ffn_dim": 2730,
    "encoder_vocab_size": 50264,
    "image_vocab_size": 16384,
    "init_std": 0.02,
}
RELEASED_MEGA = {
    **RELEASED_COMMON,
    "d_model": 2048,
    "encoder_attention_heads": 32,
    "decoder_attention_heads": 32,
    "encoder_layers": 24,
    "decoder_layers": 24,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "encoder_vocab_size": 50272,
    "image_vocab_size": 16415,  # padded for sharding; the start id stays 16384
    "init_std": 0.01,
}
# vqgan-jax VQGANConfig of dalle-mini/vqgan_imagenet_f16_16384 (reference §2.4).
RELEASED_VQGAN = {
    "_name_or_path": "dalle-mini/vqgan_imagenet_f16_16384",
    "architectures": ["VQModel"],
    "model_type": "vqgan",
    "transformers_version": "4.16.2",
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "z_channels": 256,
    "embed_dim": 256,
    "n_embed": 16384,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "double_z": False,
    "dropout": 0.0,
    "resamp_with_conv": True,
    "give_pre_end": False,
}


def _write(tmp_path, obj, name="config.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------
# DalleBart presets and released configs
# --------------------------------------------------------------------------------------


def test_mini_preset_is_the_released_mini():
    c = transformer_preset("mini")
    assert (c.embed_dim, c.num_heads, c.head_dim, c.mlp_dim) == (1024, 16, 64, 2730)
    assert (c.num_encoder_layers, c.num_decoder_layers) == (12, 12)
    assert (c.text_vocab_size, c.image_vocab_size, c.decoder_vocab_size) == (50264, 16384, 16385)
    assert (c.text_len, c.image_len) == (64, 256)
    assert c.bos_token_id == c.num_image_codes == 16384
    assert (c.ln_positions, c.use_glu, c.activation, c.init_std) == ("normformer", True, "gelu", 0.02)
    assert c.layer_norm_eps == 1e-5 and c.use_final_ln
    assert (c.text_bos_token_id, c.text_pad_token_id, c.text_eos_token_id) == (0, 1, 2)


def test_mega_preset_is_the_released_mega():
    c = transformer_preset("mega")
    assert (c.embed_dim, c.num_heads, c.head_dim, c.mlp_dim) == (2048, 32, 64, 4096)
    assert (c.num_encoder_layers, c.num_decoder_layers) == (24, 24)
    assert (c.text_vocab_size, c.image_vocab_size, c.decoder_vocab_size) == (50272, 16415, 16416)
    # Mega's tables are padded to 16416 rows, but it starts from 16384 and only ids
    # below 16384 are VQGAN codes.
    assert c.bos_token_id == c.num_image_codes == 16384
    assert c.init_std == 0.01


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_small_presets_are_consistent(name):
    c = transformer_preset(name)
    assert c.embed_dim % c.num_heads == 0
    assert c.bos_token_id == c.image_vocab_size  # BOS is the extra last row
    assert c.decoder_vocab_size == c.image_vocab_size + 1
    assert c.ln_positions == "normformer" and c.use_glu


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown transformer preset 'huge'.*mega"):
        transformer_preset("huge")
    with pytest.raises(ConfigError, match="unknown VQGAN preset 'f8'.*f16_16384"):
        vqgan_preset("f8")


def test_configs_are_frozen_and_replace_validates():
    c = transformer_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.embed_dim = 32  # type: ignore[misc]
    assert c.replace(num_decoder_layers=3).num_decoder_layers == 3
    with pytest.raises(ConfigError, match="num_heads"):
        c.replace(num_heads=5)


@pytest.mark.parametrize(
    "released, preset", [(RELEASED_MINI, "mini"), (RELEASED_MEGA, "mega")], ids=["mini", "mega"]
)
def test_released_config_json_loads_to_the_preset(tmp_path, released, preset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every released key is known: no "unused key" warning
        c = DalleBartConfig.load(_write(tmp_path, released))
    assert c == transformer_preset(preset)


@pytest.mark.parametrize(
    "released, preset", [(RELEASED_MINI, "mini"), (RELEASED_MEGA, "mega")], ids=["mini", "mega"]
)
def test_written_config_json_has_the_released_values(released, preset):
    d = transformer_preset(preset).to_released_dict()
    # tau_init only matters for cosine attention, which we refuse; the version is HF's.
    for key in sorted(set(released) - {"transformers_version", "tau_init"}):
        assert d[key] == released[key], key


def test_mega_special_ids():
    d = transformer_preset("mega").to_released_dict()
    assert d["image_vocab_size"] == 16415
    assert d["decoder_start_token_id"] == 16384
    # pad/bos/eos sit one past the start id in both releases, not at image_vocab_size + 1.
    assert d["pad_token_id"] == d["bos_token_id"] == d["eos_token_id"] == 16385
    c = DalleBartConfig.from_released_dict(d)
    assert c.decoder_start_token_id == 16384 and c.bos_token_id == 16384


@pytest.mark.parametrize("name", sorted(TRANSFORMER_PRESETS))
def test_dallebart_round_trip(tmp_path, name):
    c = transformer_preset(name)
    assert DalleBartConfig.from_released_dict(c.to_released_dict()) == c
    c.save(tmp_path / "config.json")
    assert DalleBartConfig.load(tmp_path / "config.json") == c


def test_round_trip_keeps_non_default_fields(tmp_path):
    c = transformer_preset("tiny").replace(
        ln_positions="preln", use_glu=False, activation="relu", use_final_ln=False,
        normalize_text=False, decoder_start_token_id=60, vqgan_path="../vqgan", init_std=0.05,
    )
    c.save(tmp_path / "config.json")
    back = DalleBartConfig.load(tmp_path / "config.json")
    assert back == c
    assert json.loads((tmp_path / "config.json").read_text())["vqgan_path"] == "../vqgan"


def test_start_token_equal_to_image_vocab_is_the_default():
    # A config.json naming the default start id explicitly parses to the same config.
    d = transformer_preset("tiny").to_released_dict()
    assert d["decoder_start_token_id"] == 64
    assert DalleBartConfig.from_released_dict(d).decoder_start_token_id is None


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_alibi", True),
        ("sinkhorn_iters", 2),
        ("use_swin_position_embeddings", True),
        ("ln_positions", "swinv2"),
        ("ln_positions", "cogview"),
        ("ln_positions", "postln"),
        ("ln_positions", "deepnet"),
        ("ln_positions", "subln"),
        ("use_bias", True),
        ("use_head_scale", True),
        ("use_cosine_attention", True),
        ("use_deepnet_scaling", True),
        ("use_subln_init", True),
        ("force_ln_scale", True),
        ("scale_embedding", True),
        ("tie_word_embeddings", True),
        ("use_absolute_position_embeddings", False),
        ("ln_type", "rmsnorm"),
        ("activation_function", "smelu"),
    ],
)
def test_unimplemented_option_is_refused_by_name(tmp_path, key, value):
    d = {**RELEASED_MINI, key: value}
    with pytest.raises(ConfigError) as e:
        DalleBartConfig.from_released_dict(d)
    # The message names the option (our field name for the two we rename).
    names = {"activation_function": "activation_function", "ln_positions": "ln_positions"}
    assert names.get(key, key) in str(e.value)
    assert repr(value) in str(e.value) or str(value) in str(e.value)
    with pytest.raises(ConfigError, match=key):
        DalleBartConfig.load(_write(tmp_path, d))


@pytest.mark.parametrize(
    "enc, dec, value",
    [
        ("encoder_attention_heads", "decoder_attention_heads", 8),
        ("encoder_ffn_dim", "decoder_ffn_dim", 4096),
        ("use_final_ln_encoder", "use_final_ln_decoder", False),
    ],
)
def test_different_encoder_and_decoder_settings_are_refused(enc, dec, value):
    with pytest.raises(ConfigError, match=f"{enc}=.*differs from {dec}={value}"):
        DalleBartConfig.from_released_dict({**RELEASED_MINI, dec: value})


def test_embed_dim_not_divisible_by_heads(tmp_path):
    with pytest.raises(ConfigError, match="embed_dim=100 is not divisible by num_heads=16"):
        DalleBartConfig.load(_write(tmp_path, {**RELEASED_MINI, "d_model": 100}))
    with pytest.raises(ConfigError, match="not divisible"):
        DalleBartConfig(embed_dim=64, num_heads=6)


@pytest.mark.parametrize("start", [0, 16385, 20000])
def test_start_token_out_of_range_is_refused(start):
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        DalleBartConfig.from_released_dict({**RELEASED_MINI, "decoder_start_token_id": start})


@pytest.mark.parametrize("field", ["embed_dim", "mlp_dim", "num_decoder_layers", "text_len", "image_len"])
def test_non_positive_sizes_are_refused(field):
    with pytest.raises(ConfigError, match=field):
        transformer_preset("tiny").replace(**{field: 0})


def test_wrong_model_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_type='vqgan'.*DalleBart"):
        DalleBartConfig.load(_write(tmp_path, RELEASED_VQGAN))
    with pytest.raises(ConfigError, match="model_type='bart'"):
        DalleBartConfig.from_released_dict({**RELEASED_MINI, "model_type": "bart"})


def test_bad_json_files(tmp_path):
    path = _write(tmp_path, '{"d_model": 1024,,}')
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        DalleBartConfig.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="JSON object, found list"):
        DalleBartConfig.load(_write(tmp_path, "[1, 2]"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        DalleBartConfig.load(tmp_path / "nowhere" / "config.json")


def test_unknown_key_warns_and_is_named():
    with pytest.warns(UserWarning, match="use_magic"):
        c = DalleBartConfig.from_released_dict({**RELEASED_MINI, "use_magic": True})
    assert c == transformer_preset("mini")


def test_missing_keys_take_the_released_defaults():
    # A minimal config.json: every absent key means the released (mini) value.
    assert DalleBartConfig.from_released_dict({"model_type": "dallebart"}) == transformer_preset("mini")


# --------------------------------------------------------------------------------------
# VQGAN
# --------------------------------------------------------------------------------------


def test_f16_16384_preset_is_the_released_vqgan():
    c = vqgan_preset("f16_16384")
    assert (c.channels, c.channel_mult, c.num_res_blocks, c.attn_resolutions) == (128, (1, 1, 2, 2, 4), 2, (16,))
    assert (c.z_channels, c.embed_dim, c.codebook_size, c.resolution) == (256, 256, 16384, 256)
    assert (c.in_channels, c.out_channels, c.norm_groups, c.norm_eps) == (3, 3, 32, 1e-6)
    assert (c.downsample_factor, c.grid_size, c.num_tokens) == (16, 16, 256)
    assert vqgan_preset("mini") is vqgan_preset("mega") is c


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_small_vqgan_presets(name):
    c = vqgan_preset(name)
    assert c.resolution % c.downsample_factor == 0
    assert c.grid_size == c.resolution // c.downsample_factor


def test_released_vqgan_config_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = VQGANConfig.load(_write(tmp_path, RELEASED_VQGAN))
    assert c == vqgan_preset("f16_16384")
    assert isinstance(c.channel_mult, tuple) and isinstance(c.attn_resolutions, tuple)


@pytest.mark.parametrize("name", sorted(VQGAN_PRESETS))
def test_vqgan_round_trip(tmp_path, name):
    c = vqgan_preset(name)
    assert VQGANConfig.from_released_dict(c.to_released_dict()) == c
    c.save(tmp_path / "config.json")
    assert VQGANConfig.load(tmp_path / "config.json") == c
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "vqgan" and d["double_z"] is False and d["n_embed"] == c.codebook_size


@pytest.mark.parametrize(
    "key, value", [("double_z", True), ("resamp_with_conv", False), ("give_pre_end", True)]
)
def test_vqgan_unimplemented_option_is_refused_by_name(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"{key}={value!r}"):
        VQGANConfig.load(_write(tmp_path, {**RELEASED_VQGAN, key: value}))


def test_vqgan_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="model_type='dallebart'.*VQGAN"):
        VQGANConfig.load(_write(tmp_path, RELEASED_MINI))
    with pytest.raises(ConfigError, match="not valid JSON"):
        VQGANConfig.load(_write(tmp_path, "{not json"))
    with pytest.raises(ConfigError, match="resolution=250 is not divisible"):
        VQGANConfig.from_released_dict({**RELEASED_VQGAN, "resolution": 250})
    with pytest.raises(ConfigError, match="norm_groups=32"):
        VQGANConfig.from_released_dict({**RELEASED_VQGAN, "ch": 100})
    with pytest.warns(UserWarning, match="use_magic"):
        VQGANConfig.from_released_dict({**RELEASED_VQGAN, "use_magic": 1})
