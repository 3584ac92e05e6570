"""DalleMini end to end on a tiny random model directory."""

import json

import jax
import numpy as np
import pytest

from dalle_mini_jax import DalleMini, sampling
from dalle_mini_jax.config import ConfigError
from dalle_mini_jax.pipeline import (GENERATION_CONFIG_NAME, NEUTRAL_GREY, image_grid,
                                     read_generation_config, resolve_dtype, write_generation_config)
from dalle_mini_jax.sampling import SamplingSettings
from dalle_mini_jax.sharding import make_mesh
from tests.model_dirs import tiny_model_dir  # noqa: F401  (fixture)

PROMPTS = ["a red square on a white background", "three green triangles in a row"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):  # noqa: F811
    return DalleMini.from_pretrained(tiny_model_dir, compile_ahead=False)  # its tests compile what they use


def _arr(images):
    return np.stack([np.asarray(i) for i in images])


def linked_copy(model_dir, dst):
    """A new model directory whose entries are symlinks to `model_dir`'s: costs nothing,
    and a generation_config.json written into it leaves the shared fixture alone."""
    dst.mkdir()
    for entry in model_dir.iterdir():
        (dst / entry.name).symlink_to(entry)
    return dst


def test_generate_shapes_order_and_metadata(pipe):
    images = pipe.generate(PROMPTS, num_images=2, seed=3)
    assert len(images) == 4
    side = pipe.vqgan.config.resolution
    assert all(i.size == (side, side) and i.mode == "RGB" for i in images)
    assert [i.info["prompt"] for i in images] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [i.info["index"] for i in images] == ["0", "1", "0", "1"]
    assert images[0].info["seed"] == "3"
    # No generation_config.json: the released defaults, recorded as used.
    assert pipe.defaults == SamplingSettings()
    assert json.loads(images[0].info["settings"]) == {"temperature": 1.0, "top_k": 50, "top_p": None,
                                                      "guidance": 10.0}
    # A single prompt string works too.
    assert len(pipe.generate(PROMPTS[0])) == 1


def test_seed_invariance_across_calls(pipe):
    """Image k of prompt p is the same whatever else the call holds."""
    both = pipe.generate_codes(PROMPTS, num_images=2, seed=5)                 # one batch of 4
    alone = pipe.generate_codes([PROMPTS[1]], num_images=2, seed=5)           # other prompts
    split = pipe.generate_codes(PROMPTS, num_images=2, batch_size=2, seed=5)  # other batches
    np.testing.assert_array_equal(both[2:], alone)
    np.testing.assert_array_equal(both, split)
    other_seed = pipe.generate_codes([PROMPTS[1]], num_images=2, seed=6)
    assert not np.array_equal(other_seed, alone)
    assert both.max() < pipe.config.num_image_codes


def test_second_call_does_not_recompile(pipe):
    pipe.generate(PROMPTS, num_images=1, seed=0)
    before = dict(sampling.TRACE_COUNTS)
    pipe.generate(PROMPTS, num_images=1, seed=9, guidance=4.0, temperature=0.7)
    assert dict(sampling.TRACE_COUNTS) == before


def test_loading_compiles_the_default_generation(tiny_model_dir, tmp_path):  # noqa: F811
    """`from_pretrained` compiles the sampler for one image with the model's defaults
    (`compile_for`, while nothing else is alive), so `generate(prompt)` compiles nothing;
    `compile_for` with other arguments likewise. Top-k values of its own keep other
    tests' programs out of jit's cache."""
    model_dir = linked_copy(tiny_model_dir, tmp_path / "model")
    write_generation_config(model_dir, top_k=7, guidance=3.0)
    p = DalleMini.from_pretrained(model_dir)
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        before = dict(sampling.TRACE_COUNTS)
        p.generate(PROMPTS[0], seed=2)
        assert dict(sampling.TRACE_COUNTS) == before and not compiles
        p.generate(PROMPTS[0], seed=2, top_k=6)  # not the default: compiled now
        assert compiles
        p.compile_for(len(PROMPTS), num_images=2, top_k=5, batch_size=3)  # batches of 3 and 1
        compiles.clear()
        p.generate(PROMPTS, num_images=2, seed=2, top_k=5, batch_size=3)
        assert not compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_stream_previews_and_final_equal_generate(pipe):
    final = _arr(pipe.generate(PROMPTS[0], num_images=2, seed=1))
    frames = list(pipe.generate_stream(PROMPTS[0], num_images=2, seed=1, every=5))
    S = pipe.config.image_len
    assert [f.step for f in frames] == [5, 10, 15, S]
    assert frames[-1].final and not frames[0].final
    np.testing.assert_array_equal(_arr(frames[-1].images), final)
    # Not-yet-generated token cells are neutral grey; generated ones are decoded.
    grid = int(np.sqrt(S))
    f = pipe.vqgan.config.resolution // grid
    first = _arr(frames[0].images)  # 5 tokens done: cells 0..4 of a 4x4 grid
    grey = round(NEUTRAL_GREY * 255) - 1  # uint8(0.5 * 255) = 127
    for cell in range(S):
        r, c = divmod(cell, grid)
        block = first[:, r * f:(r + 1) * f, c * f:(c + 1) * f]
        if cell >= 5:
            assert (block == grey).all()
    assert not (first[:, :f, :f] == grey).all()  # generated cell 0 is decoded, not painted


def test_sharded_pipeline_gives_the_same_images(tiny_model_dir, pipe):  # noqa: F811
    want = _arr(pipe.generate(PROMPTS, num_images=2, seed=2))
    sharded = DalleMini.from_pretrained(tiny_model_dir, mesh=make_mesh(data=2, tensor=4))
    got = _arr(sharded.generate(PROMPTS, num_images=2, seed=2))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # same codes; pixel rounding


def test_bfloat16_load(tiny_model_dir):  # noqa: F811
    import jax
    import jax.numpy as jnp

    p = DalleMini.from_pretrained(tiny_model_dir, dtype="bfloat16")
    assert p.model.enc_embed.tokens[...].dtype == jnp.bfloat16
    assert p.vqgan.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves((p.sampler._layers, p.sampler._head))} == {jnp.dtype(jnp.bfloat16)}


def test_token_tables_stay_in_the_checkpoint_file(tiny_model_dir, pipe):  # noqa: F811
    """`from_pretrained` maps the encoder's token table from the file instead of loading it
    (a prompt reads T of its rows), and on a CPU the decoder's too (a step reads a row per
    image, `sampling.HostTable`): same codes as a pipeline over the fully loaded model, in
    float32 and bfloat16; the model alone cannot encode without the rows."""
    from dalle_mini_jax.config import DalleBartConfig
    from dalle_mini_jax.pipeline import VQGANDecoder, resolve_vqgan_dir
    from dalle_mini_jax.sampling import HostTable
    from dalle_mini_jax.transformer import DalleBart

    assert pipe.model.enc_embed.tokens[...].shape == (0, pipe.config.embed_dim)
    assert isinstance(pipe.sampler._text_table, np.memmap)
    vq_dir = resolve_vqgan_dir(tiny_model_dir, DalleBartConfig.load(tiny_model_dir / "config.json"), None)
    for dtype in ("float32", "bfloat16"):
        mapped = pipe if dtype == "float32" else DalleMini.from_pretrained(tiny_model_dir, dtype=dtype)
        assert mapped.model.dec_embed.tokens[...].shape == (0, pipe.config.embed_dim)
        assert isinstance(mapped.sampler._tokens, HostTable)
        full = DalleMini(DalleBart.from_pretrained(tiny_model_dir, dtype=resolve_dtype(dtype)),
                         VQGANDecoder.from_pretrained(vq_dir, dtype=resolve_dtype(dtype)), pipe.tokenizer)
        assert full.model.enc_embed.tokens[...].shape[0] == pipe.config.text_vocab_size
        np.testing.assert_array_equal(mapped.generate_codes(PROMPTS, num_images=2, seed=4),
                                      full.generate_codes(PROMPTS, num_images=2, seed=4))
    tok = pipe.tokenizer(PROMPTS)
    with pytest.raises(ValueError, match="token_rows"):
        pipe.model.encode(tok["input_ids"], tok["attention_mask"])


def test_errors(tmp_path, pipe):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DalleMini.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="no prompts"):
        pipe.generate([])
    with pytest.raises(ValueError, match="num_images"):
        pipe.generate("x", num_images=0)
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate("x", top_p=1.5)


def test_generation_config_is_read_by_from_pretrained(tiny_model_dir, tmp_path):  # noqa: F811
    model_dir = linked_copy(tiny_model_dir, tmp_path / "model")
    (model_dir / GENERATION_CONFIG_NAME).write_text('{"guidance": 3, "top_k": null}')
    p = DalleMini.from_pretrained(model_dir)
    # Keys the file leaves out keep the released defaults.
    assert p.defaults == SamplingSettings(temperature=1.0, top_k=None, top_p=None, guidance=3.0)


def test_model_defaults_used_unless_overridden(pipe, monkeypatch):
    want = SamplingSettings(temperature=0.9, top_k=16, top_p=None, guidance=3.0)
    explicit = pipe.generate_codes(PROMPTS[0], num_images=2, seed=1, temperature=0.9, top_k=16,
                                   guidance=3.0)
    monkeypatch.setattr(pipe, "defaults", want)
    np.testing.assert_array_equal(pipe.generate_codes(PROMPTS[0], num_images=2, seed=1), explicit)
    used = lambda images: json.loads(images[0].info["settings"])  # noqa: E731
    assert used(pipe.generate(PROMPTS[0], seed=1)) == want.to_dict()
    S = pipe.config.image_len
    assert used(list(pipe.generate_stream(PROMPTS[0], seed=1, every=S))[-1].images) == want.to_dict()
    # An explicit value overrides the model's; explicit None still means off.
    assert used(pipe.generate(PROMPTS[0], seed=1, top_k=None)) == dict(want.to_dict(), top_k=None)
    assert used(pipe.generate(PROMPTS[0], seed=1, guidance=None, temperature=0.5)) == dict(
        want.to_dict(), guidance=None, temperature=0.5)


def test_write_and_read_generation_config(tmp_path):
    assert read_generation_config(tmp_path) == SamplingSettings()  # absent: the released ones
    path = write_generation_config(tmp_path, guidance=3, top_k=None, temperature=np.float32(0.5))
    assert path == tmp_path / GENERATION_CONFIG_NAME
    # All four keys are written: the ones not given get the released defaults.
    assert json.loads(path.read_text()) == {"temperature": 0.5, "top_k": None, "top_p": None,
                                            "guidance": 3.0}
    assert read_generation_config(tmp_path) == SamplingSettings(0.5, None, None, 3.0)
    with pytest.raises(ValueError, match="top_p"):
        write_generation_config(tmp_path, top_p=2.0)
    with pytest.raises(FileNotFoundError):
        write_generation_config(tmp_path / "nope", guidance=3)


@pytest.mark.parametrize("text, message", [
    ('{"top_k": "50"}', "top_k must be an integer >= 1 or null"),
    ('{"top_k": 2.5}', "top_k must be an integer >= 1 or null"),
    ('{"top_k": 0}', "top_k must be a positive integer"),
    ('{"temperature": null}', "temperature must be a number > 0, got null"),
    ('{"guidance": true}', "guidance must be a finite number or null"),
    ('{"top_p": 1.5}', "top_p must lie in"),
    ('[3]', "must hold a JSON object"),
    ('{"guidance": 3,}', "not valid JSON"),
])
def test_bad_generation_config_is_a_clear_error(tiny_model_dir, tmp_path, text, message):  # noqa: F811
    model_dir = linked_copy(tiny_model_dir, tmp_path / "model")
    (model_dir / GENERATION_CONFIG_NAME).write_text(text)
    with pytest.raises(ConfigError, match="generation_config.json") as e:
        DalleMini.from_pretrained(model_dir)
    assert message in str(e.value)


def test_unknown_generation_config_keys_warn(tmp_path):
    (tmp_path / GENERATION_CONFIG_NAME).write_text(
        '{"guidance": 4, "guidance_scale": 3, "transformers_version": "4.40", "_from_model_config": true}')
    with pytest.warns(UserWarning, match="ignored\\): guidance_scale;"):
        assert read_generation_config(tmp_path) == SamplingSettings(guidance=4.0)


def test_bundled_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    from dalle_mini_jax import pipeline

    monkeypatch.setattr(pipeline, "BUNDLED_MODEL_DIR", tmp_path / "bundled" / "model")
    with pytest.raises(FileNotFoundError, match="no bundled model"):
        DalleMini.from_pretrained()


def test_image_grid():
    from PIL import Image

    imgs = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(imgs)
    assert g.size == (12, 8)
    assert g.getpixel((4, 0)) == (40, 0, 0) and g.getpixel((0, 4)) == (120, 0, 0)
