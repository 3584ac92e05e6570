"""Model directories: the released flax msgpack format in and out, dtypes, and errors.

A released `flax_model.msgpack` is `flax.serialization.to_bytes(params)` of the nested
released tree (reference §2.1); the tests write such files with flax itself, so they
check compatibility with the original code, not just with our own writer.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx, serialization

from dalle_mini_jax import checkpoint as ckpt
from dalle_mini_jax.checkpoint import CheckpointError
from dalle_mini_jax.config import ConfigError, transformer_preset
from dalle_mini_jax.transformer import DalleBart

BF16 = np.dtype(ml_dtypes.bfloat16)
Q_KERNEL = "model/decoder/layers/FlaxBartDecoderLayers/FlaxBartAttention_0/q_proj/kernel"


@pytest.fixture(scope="module")
def model() -> DalleBart:
    """The tiny preset with every norm moved off 1/0, so nothing is trivially equal."""
    m = DalleBart(transformer_preset("tiny"), rngs=nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    flat = ckpt.flatten(nnx.to_pure_dict(state))
    rng = np.random.default_rng(0)
    for k, v in flat.items():
        if k.endswith(("scale", "bias")):
            flat[k] = jnp.asarray(v + 0.3 * rng.standard_normal(v.shape), v.dtype)
    nnx.replace_by_pure_dict(state, ckpt.unflatten(flat))
    nnx.update(m, state)
    return m


@pytest.fixture(scope="module")
def params(model) -> dict[str, np.ndarray]:
    return model.released_params()


def write_dir(path, config, tree) -> None:
    """A model directory as the original code writes it: config.json + to_bytes(params)."""
    path.mkdir(parents=True, exist_ok=True)
    config.save(path / ckpt.CONFIG_NAME)
    (path / ckpt.MSGPACK_NAME).write_bytes(serialization.to_bytes(ckpt.unflatten(tree)))


def loaded_params(model: DalleBart) -> dict[str, np.ndarray]:
    return model.released_params()


def assert_bit_exact(got: dict, want: dict, dtype=np.float32) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == dtype, k
        assert got[k].shape == want[k].shape, k
        # Compare bit patterns: equal values are not enough to call a copy exact.
        assert np.array_equal(got[k].view(np.uint8), np.asarray(want[k], dtype).view(np.uint8)), k


# --------------------------------------------------------------------------------------
# round trips and compatibility with flax.serialization
# --------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_is_bit_exact(model, params, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CONFIG_NAME, ckpt.MSGPACK_NAME]
    back = DalleBart.from_pretrained(tmp_path)
    assert back.config == model.config
    assert_bit_exact(loaded_params(back), params)
    assert json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())["model_type"] == "dallebart"


def test_file_written_by_flax_to_bytes_loads(model, params, tmp_path):
    write_dir(tmp_path, model.config, params)
    assert_bit_exact(loaded_params(DalleBart.from_pretrained(tmp_path)), params)


def test_our_file_is_read_by_flax_msgpack_restore(model, params, tmp_path):
    model.save_pretrained(tmp_path)
    tree = serialization.msgpack_restore((tmp_path / ckpt.MSGPACK_NAME).read_bytes())
    assert sorted(tree) == ["lm_head", "model"]  # no "params" wrapper, as released
    assert_bit_exact(ckpt.flatten(tree), params)
    # And flax can restore it into a target of the released structure.
    target = jax.tree.map(np.zeros_like, ckpt.unflatten(params))
    restored = serialization.from_bytes(target, (tmp_path / ckpt.MSGPACK_NAME).read_bytes())
    assert_bit_exact(ckpt.flatten(restored), params)


def test_chunked_arrays_both_ways(model, params, tmp_path, monkeypatch):
    """Arrays over flax's MAX_CHUNK_SIZE are stored as chunk maps; shrink it to test that."""
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 4096)
    write_dir(tmp_path / "flax", model.config, params)
    raw = serialization.msgpack_restore((tmp_path / "flax" / ckpt.MSGPACK_NAME).read_bytes())
    assert "__msgpack_chunked_array__" not in str(ckpt.flatten(raw).keys())  # flax unchunks
    assert_bit_exact(loaded_params(DalleBart.from_pretrained(tmp_path / "flax")), params)

    monkeypatch.setattr(ckpt, "_MAX_CHUNK_BYTES", 4096)
    ckpt.write_msgpack(tmp_path / "ours.msgpack", params)
    assert_bit_exact(ckpt.flatten(serialization.msgpack_restore((tmp_path / "ours.msgpack").read_bytes())), params)
    assert_bit_exact(ckpt.read_msgpack(tmp_path / "ours.msgpack"), params)


def test_reader_decodes_every_msgpack_type_flax_writes(tmp_path, monkeypatch):
    """Our hand decoder against msgpack itself: ints of every width, floats, strings of
    every length class, nested maps, numpy scalars, complex, bf16 and int arrays; casting
    through a buffer smaller than one tensor gives what casting afterwards gives."""
    rng = np.random.default_rng(0)
    tree = {
        "ints": {"a": np.int64(5), "b": np.array(-3, np.int32), "c": np.array(2**40, np.int64)},
        "w": rng.standard_normal((37, 53)).astype(np.float32),
        "h": rng.standard_normal((9, 4)).astype(BF16),
        "ids": rng.integers(-2**31, 2**31 - 1, (300,), dtype=np.int64),
        "c": np.complex64(1.5 - 2j),
        "k" * 40: {"x" * 300: np.float32(0.25), "y" * 70000: np.zeros((0, 3), np.float32)},
        **{f"m{i}": np.float64(i / 7) for i in range(20)},  # a map16
    }
    path = tmp_path / "t.msgpack"
    path.write_bytes(serialization.to_bytes(tree))
    want = ckpt.flatten(serialization.msgpack_restore(path.read_bytes()))
    got = ckpt.read_msgpack(path)
    assert got.keys() == want.keys()
    for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    monkeypatch.setattr(ckpt, "_CAST_CHUNK_BYTES", 100)  # 25 float32s: 79 chunks for "w"
    cast = ckpt.read_msgpack(path, dtype=BF16)
    assert cast["w"].dtype == BF16 and cast["ids"].dtype == np.int64
    np.testing.assert_array_equal(cast["w"].view(np.uint16), want["w"].astype(BF16).view(np.uint16))


def test_reading_a_tensor_cast_holds_no_second_copy_of_it(tmp_path, monkeypatch):
    """Loading bf16 from an fp32 file allocates the bf16 result and one bounded buffer:
    msgpack's own unpacker held three fp32 copies of the largest tensor at once."""
    import tracemalloc

    big = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    path = tmp_path / "big.msgpack"
    ckpt.write_msgpack(path, {"a/kernel": big})
    monkeypatch.setattr(ckpt, "_CAST_CHUNK_BYTES", 2**20)
    tracemalloc.start()
    try:
        out = ckpt.read_msgpack(path, dtype=BF16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["a/kernel"].dtype == BF16
    assert peak < big.nbytes / 2 + 3 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_damaged_lengths_fail_before_allocating(tmp_path):
    """A length field past the end of the file is 'truncated', not a 4 GiB allocation."""
    path = tmp_path / "bad.msgpack"
    path.write_bytes(b"\x81\xa1a\xc9\xff\xff\xff\xf0\x01")  # {"a": ext32 of ~4 GiB}
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.read_msgpack(path)
    path.write_bytes(b"\x81\xa1a\xc7\x05\x01\x93\x91\x02\xa3int")  # payload cut short
    with pytest.raises(CheckpointError, match=str(path)):
        ckpt.read_msgpack(path)


def test_unscanned_layout_loads_like_scanned(model, params, tmp_path):
    """`DalleBart.unscan` names: FlaxBartEncoderLayer_{i}/... with the layer axis removed."""
    unscanned = {}
    for k, v in params.items():
        for stack in ("Encoder", "Decoder"):
            scanned = f"FlaxBart{stack}Layers"
            if scanned in k:
                for i in range(v.shape[0]):
                    unscanned[k.replace(scanned, f"FlaxBart{stack}Layer_{i}")] = v[i]
                break
        else:
            unscanned[k] = v
    assert "model/encoder/layers/FlaxBartEncoderLayer_1/GLU_0/Dense_2/kernel" in unscanned
    write_dir(tmp_path / "ok", model.config, unscanned)
    assert_bit_exact(loaded_params(DalleBart.from_pretrained(tmp_path / "ok")), params)

    # A missing layer is named, not silently stacked into a shorter model.
    gap = {k: v for k, v in unscanned.items() if "FlaxBartDecoderLayer_0/" not in k}
    write_dir(tmp_path / "gap", model.config, gap)
    with pytest.raises(CheckpointError, match="FlaxBartDecoderLayers"):
        DalleBart.from_pretrained(tmp_path / "gap")


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [np.float16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("load", [jnp.float32, jnp.bfloat16], ids=["as_fp32", "as_bf16"])
def test_half_precision_files_load(model, params, tmp_path, stored, load):
    """min-dalle's and the fp16 W&B artifact's weights are fp16; bf16 files exist too."""
    half = {k: v.astype(stored) for k, v in params.items()}
    write_dir(tmp_path, model.config, half)
    loaded = DalleBart.from_pretrained(tmp_path, dtype=load)
    want = {k: v.astype(np.dtype(load)) for k, v in half.items()}
    assert_bit_exact(loaded_params(loaded), want, np.dtype(load))


def test_bfloat16_load_gives_bfloat16_params(model, params, tmp_path):
    """(A bf16 forward pass is run in test_transformer.py, beside the compiled fp32 one.)"""
    model.save_pretrained(tmp_path)
    bf = DalleBart.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    leaves = jax.tree.leaves(nnx.state(bf, nnx.Param))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert_bit_exact(loaded_params(bf), {k: v.astype(BF16) for k, v in params.items()}, BF16)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def _expect_error(tmp_path, config, tree, *fragments):
    write_dir(tmp_path, config, tree)
    with pytest.raises(CheckpointError) as e:
        DalleBart.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / ckpt.MSGPACK_NAME) in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in:\n{msg}"
    return msg


def test_missing_tensor_is_named(model, params, tmp_path):
    tree = {k: v for k, v in params.items() if k != Q_KERNEL}
    _expect_error(tmp_path, model.config, tree, f"missing tensor {Q_KERNEL} (expected shape (2, 64, 64))")


def test_unexpected_tensor_is_named(model, params, tmp_path):
    tree = {**params, "model/decoder/final_ln/scale": np.ones(64, np.float32)}
    _expect_error(tmp_path, model.config, tree, "unexpected tensor model/decoder/final_ln/scale (shape (64,))")


def test_misshapen_tensor_is_named(model, params, tmp_path):
    tree = {**params, Q_KERNEL: params[Q_KERNEL][:, :, :32]}
    _expect_error(
        tmp_path, model.config, tree,
        f"misshapen tensor {Q_KERNEL}: expected shape (2, 64, 64), found (2, 64, 32)",
    )


def test_config_that_does_not_match_the_weights(model, params, tmp_path):
    """Weights of a 2-layer decoder under a config.json that says 3: every stacked tensor."""
    msg = _expect_error(tmp_path, model.config.replace(num_decoder_layers=3), params, Q_KERNEL)
    assert "expected shape (3, 64, 64), found (2, 64, 64)" in msg
    assert msg.count("misshapen tensor model/decoder/layers/") == 19  # 8 attention + 3 GLU kernels, 8 norm tensors


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda good: np.random.default_rng(0).bytes(5000), "damaged"),
        (lambda good: good[: len(good) // 2], "truncated"),
        (lambda good: good[:-1], "truncated"),
        (lambda good: b"", "truncated"),
        (lambda good: good + b"\x00garbage", "trailing data"),
        (lambda good: serialization.msgpack_serialize([1, 2, 3]), "does not hold a parameter tree"),
    ],
    ids=["random", "half", "last-byte", "empty", "trailing", "not-a-tree"],
)
def test_damaged_msgpack_gives_a_clear_error(model, tmp_path, damage, fragment):
    model.save_pretrained(tmp_path)
    path = tmp_path / ckpt.MSGPACK_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        DalleBart.from_pretrained(tmp_path)
    assert str(path) in str(e.value)
    if fragment != "damaged":  # random bytes fail in whichever way they happen to
        assert fragment in str(e.value)


def test_incomplete_directories(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        DalleBart.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(tmp_path)
    (tmp_path / ckpt.MSGPACK_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"has no {ckpt.MSGPACK_NAME}"):
        DalleBart.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    (tmp_path / ckpt.CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"has no {ckpt.CONFIG_NAME}"):
        DalleBart.from_pretrained(tmp_path)


def test_unsupported_config_is_refused_before_reading_weights(model, tmp_path):
    model.save_pretrained(tmp_path)
    d = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps({**d, "use_alibi": True}))
    with pytest.raises(ConfigError, match="use_alibi"):
        DalleBart.from_pretrained(tmp_path)


def test_check_tree_lists_every_problem():
    with pytest.raises(CheckpointError) as e:
        ckpt.check_tree(
            {"a": np.zeros((2, 3)), "b": np.zeros(4), "x": np.zeros(1)},
            {"a": (2, 3), "b": (5,), "c": (7, 7)},
            "some.msgpack",
        )
    lines = str(e.value).splitlines()
    assert lines[0].startswith("some.msgpack does not match")
    assert "  missing tensor c (expected shape (7, 7))" in lines
    assert "  unexpected tensor x (shape (1,))" in lines
    assert "  misshapen tensor b: expected shape (5,), found (4,)" in lines
    ckpt.check_tree({"a": np.zeros((2, 3))}, {"a": (2, 3)}, "ok")  # no error


def test_write_is_atomic(params, tmp_path, monkeypatch):
    """A save that fails half-way leaves neither a partial file nor a temp file behind."""
    path = tmp_path / ckpt.MSGPACK_NAME
    ckpt.write_msgpack(path, params)
    good = path.read_bytes()

    def boom(x):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_pack_default", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_msgpack(path, params)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.MSGPACK_NAME]


def test_read_msgpack_maps_the_tensors_it_is_told_to(tmp_path):
    """`mapped` tensors come back as read-only maps of the file in their stored dtype
    (only the rows read are ever resident); the rest are read and cast as usual."""
    flat = {"enc/table": np.arange(24, dtype=np.float32).reshape(6, 4), "enc/b": np.ones(3, np.float32),
            "empty": np.zeros((0, 4), np.float32)}
    ckpt.write_msgpack(tmp_path / "m.msgpack", flat)
    got = ckpt.read_msgpack(tmp_path / "m.msgpack", dtype=ml_dtypes.bfloat16, mapped=("enc/table", "empty"))
    table = got["enc/table"]
    assert isinstance(table, np.memmap) and table.dtype == np.float32 and not table.flags.writeable
    np.testing.assert_array_equal(table, flat["enc/table"])
    np.testing.assert_array_equal(table[[5, 0]], flat["enc/table"][[5, 0]])
    assert got["empty"].shape == (0, 4)
    assert not isinstance(got["enc/b"], np.memmap) and got["enc/b"].dtype == ml_dtypes.bfloat16
    assert set(got) == set(flat)
