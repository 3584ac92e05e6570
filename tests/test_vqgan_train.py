"""VQGAN training: loss goes down, dead codes restart, exact resume, export, fine-tuning.

Everything runs the `tiny` VQGAN (16x16 images, 4x4 tokens, 32 codes) on the shapes set
resized to 16x16, a few steps each. Runs with one config share one compile
(`jitted_train_step` is cached on the config), so the tests reuse `_cfg()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_mini_jax import vqgan_train as vt
from dalle_mini_jax.vqgan import VQModel

REPO = Path(__file__).resolve().parents[1]


def _cfg(**changes) -> vt.VQGANTrainConfig:
    return vt.tiny_config().replace(num_steps=8, log_every=2, **changes)


def _params(model_dir) -> dict[str, np.ndarray]:
    return VQModel.from_pretrained(model_dir).released_params()


def _metrics(workdir, split):
    lines = (workdir / vt.METRICS_NAME).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 8-step run (also the reference for the resume test)."""
    workdir = tmp_path_factory.mktemp("vqgan_full")
    model_dir = vt.train_vqgan(_cfg(), workdir)
    return workdir, model_dir


def test_training_lowers_the_loss_and_reports(trained):
    workdir, model_dir = trained
    train = _metrics(workdir, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert train[-1]["l1"] < 0.7 * train[0]["l1"], train
    (final,) = _metrics(workdir, "eval")
    assert final["step"] == 8 and {"psnr", "codebook_usage", "perplexity"} <= set(final)
    assert final["psnr"] > 10 and 0 < final["codebook_usage"] <= 1
    assert (workdir / vt.CONFIG_NAME).is_file()
    assert sorted(p.name for p in (workdir / vt.CHECKPOINT_DIR).iterdir()) == ["8"]


def test_export_round_trip_and_unit_codebook(trained):
    workdir, model_dir = trained
    model = VQModel.from_pretrained(model_dir)
    assert model.config == vt.tiny_config().model
    # l2 mode keeps the stored codes exactly unit-norm, so VQModel.encode picks the code
    # training picked (module docstring of vqgan_train).
    np.testing.assert_allclose(jnp.linalg.norm(model.quantize.codebook, axis=1), 1.0, atol=1e-5)
    reloaded = _params(model_dir)
    model.save_pretrained(workdir / "again")
    again = _params(workdir / "again")
    assert reloaded.keys() == again.keys()
    for k in reloaded:
        np.testing.assert_array_equal(reloaded[k], again[k])


def test_resume_continues_exactly(trained, tmp_path):
    """Stopped at step 4 and resumed, a run ends with the uninterrupted run's weights."""
    _, reference = trained
    assert vt.train_vqgan(_cfg(), tmp_path, stop_at_step=4) is None
    assert not (tmp_path / vt.MODEL_DIR).exists()
    # The transformer trainer's layout (train_checkpoint): the state and a JSON item.
    step4 = tmp_path / vt.CHECKPOINT_DIR / "4"
    assert sorted(p.name for p in step4.iterdir() if p.is_dir()) == ["meta", "state"]
    model_dir = vt.train_vqgan(_cfg(), tmp_path)
    got, want = _params(model_dir), _params(reference)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    steps = [r["step"] for r in _metrics(tmp_path, "train")]
    assert steps == [2, 4, 6, 8]


def _step_once(cfg, state, graphdef, images):
    cfg = cfg.step_config()
    return vt.jitted_train_step(state, images, np.float32(cfg.learning_rate), graphdef=graphdef,
                                tx=vt.make_optimizer(cfg), cfg=cfg)


def test_dead_codes_are_restarted_from_batch_latents():
    cfg = _cfg()  # restart check at step 0 (every 5 steps); the fixture's compile
    model = vt.new_model(cfg.model, 0)
    tx = vt.make_optimizer(cfg.step_config())
    graphdef, state = vt.init_state(model, cfg, tx, fresh=False)
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, 16, 16, 3), np.uint8)
    # Dead: the codes this batch does not use, given usage 0. Their usage stays 0 after
    # the step's EMA update, below any threshold; the others stay at the mean, above it.
    # (The state's codebook is the unit-norm one; the step donates the state, so the
    # latents are taken first.)
    start_model = nnx.merge(graphdef, state.params)
    codes, z = nnx.jit(lambda m, x: (m.encode(x), m.encode_latents(x)))(start_model,
                                                                      images / 255.0)
    codes, z = np.asarray(codes), np.asarray(z).reshape(-1, cfg.model.embed_dim)
    k = cfg.model.codebook_size
    dead = np.bincount(codes.reshape(-1), minlength=k) == 0
    assert 0 < dead.sum() < k
    before = np.asarray(state.params["quantize"]["embedding"]["embedding"][...])
    state = state.replace(usage=jnp.where(jnp.asarray(dead), 0.0, state.usage))
    new, metrics = _step_once(cfg, state, graphdef, images)
    after = np.asarray(new.params["quantize"]["embedding"]["embedding"][...])
    assert int(metrics["restarted"]) == dead.sum()
    # Every dead code moved onto a latent of this batch: unit-norm (l2 mode) and distinct.
    assert np.abs(after[dead] - before[dead]).max(1).min() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(after[dead], axis=1), 1.0, atol=1e-5)
    assert len(np.unique(after[dead].round(5), axis=0)) == dead.sum()
    # ... and got a usage that gives it time to win latents before the next check.
    mean_usage = cfg.batch_size * cfg.model.num_tokens / k
    assert np.all(np.asarray(new.usage)[dead] > cfg.dead_threshold * mean_usage)
    # The restarted codes are latents the encoder produced for this batch.
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    nearest = np.abs(after[dead][:, None, :] - z[None]).max(-1).min(1)
    assert nearest.max() < 1e-4


def test_error_weighted_restarts_skip_latents_their_codes_already_serve():
    """restart_from='error': dead codes restart on latents far from every code (k-means++
    seeding), never on latents that sit exactly on a code."""
    cfg = _cfg(restart_from="error")
    model = vt.new_model(cfg.model, 0)
    graphdef, state = vt.init_state(model, cfg, vt.make_optimizer(cfg.step_config()),
                                    fresh=False)
    images = np.random.default_rng(2).integers(0, 256, (cfg.batch_size, 16, 16, 3), np.uint8)
    z = nnx.jit(lambda m, x: m.encode_latents(x))(nnx.merge(graphdef, state.params),
                                                   images / 255.0)
    z = np.asarray(z).reshape(-1, cfg.model.embed_dim)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)  # l2 mode: latents and codes unit-norm
    k, served = cfg.model.codebook_size, 16
    # Codes 0-15 sit on latents 0-15 (distance 0) and are well used; codes 16-31 are dead.
    codebook = np.asarray(state.params["quantize"]["embedding"]["embedding"][...]).copy()
    codebook[:served] = z[:served]
    params = vt._set_codebook(graphdef, state.params, jnp.asarray(codebook))
    usage = np.where(np.arange(k) < served, 10.0, 0.0).astype(np.float32)
    state = state.replace(params=params, usage=jnp.asarray(usage),
                          code_sum=jnp.asarray(codebook * usage[:, None]))
    new, metrics = _step_once(cfg, state, graphdef, images)
    after = np.asarray(new.params["quantize"]["embedding"]["embedding"][...])
    assert int(metrics["restarted"]) == k - served
    distance = np.abs(after[served:, None, :] - z[None]).max(-1)  # [dead, latents]
    assert distance.min(1).max() < 1e-4  # each restarted code is a latent of the batch
    assert (distance.argmin(1) >= served).all()  # ... and not one a code already served


def test_edge_error_weights_isolated_errors_and_ignores_flat_offsets():
    """`edge_weight`'s term: an error at one interior pixel costs twice its L2 mean (it
    differs from four neighbours); an offset shared by the whole image costs nothing."""
    x = jnp.zeros((1, 6, 6, 3))
    e = 0.5
    one = x.at[0, 2, 3, 1].set(e)
    l2 = float(jnp.mean(jnp.square(one - x)))
    np.testing.assert_allclose(float(vt._edge_error(one, x)), 2 * e * e / (5 * 6 * 3), rtol=1e-6)
    # both means are over ~the same number of entries: about 2x the L2 term
    assert 1.9 < float(vt._edge_error(one, x)) / l2 < 2.5
    assert float(vt._edge_error(x + 0.3, x)) == 0.0
    with pytest.raises(ValueError):
        vt.VQGANTrainConfig(edge_weight=-1.0)


def test_fresh_model_takes_its_codebook_from_the_first_batch():
    cfg = _cfg()
    model = vt.new_model(cfg.model, 0)
    graphdef, state = vt.init_state(model, cfg, vt.make_optimizer(cfg.step_config()), fresh=True)
    images = np.random.default_rng(1).integers(0, 256, (cfg.batch_size, 16, 16, 3), np.uint8)
    _, metrics = _step_once(cfg, state, graphdef, images)
    assert int(metrics["restarted"]) == cfg.model.codebook_size


def test_parameter_average_follows_its_formula_and_the_better_set_is_exported(tmp_path):
    cfg = _cfg(param_ema=0.9)
    model = vt.new_model(cfg.model, 0)
    graphdef, state = vt.init_state(model, cfg, vt.make_optimizer(cfg.step_config()), fresh=True)
    flat = lambda tree: [np.array(x) for x in jax.tree.leaves(tree)]  # noqa: E731 (copies: the step donates)
    ema = flat(state.ema_params)
    for x, p in zip(ema, flat(state.params)):
        np.testing.assert_array_equal(x, p)
    rng = np.random.default_rng(2)
    for t in range(3):
        images = rng.integers(0, 256, (cfg.batch_size, 16, 16, 3), np.uint8)
        state, _ = _step_once(cfg, state, graphdef, images)
        d = min(0.9, (1 + t) / (10 + t))  # the warm-up: early steps weigh the new params most
        ema = [d * e + (1 - d) * p for e, p in zip(ema, flat(state.params))]
        for got, want in zip(flat(state.ema_params), ema):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert state.eval_params() is state.ema_params
    # A run evaluates both sets at the end and exports the one that scores better.
    model_dir = vt.train_vqgan(cfg, tmp_path)
    *_, avg, raw = _metrics(tmp_path, "eval")
    assert raw["weights"] == "raw" and "weights" not in avg and avg["step"] == raw["step"] == 8
    best = max(avg, raw, key=vt._score)
    images, captions = vt.load_eval_images(cfg, 16)
    got = vt.reconstruction_metrics(VQModel.from_pretrained(model_dir), images, captions)
    assert got["psnr"] == pytest.approx(best["psnr"], abs=1e-6)
    with pytest.raises(ValueError, match="param_ema"):
        _cfg(param_ema=1.0)


def test_fine_tune_from_a_saved_directory(trained, tmp_path):
    _, model_dir = trained
    start = _params(model_dir)
    cfg = _cfg(init=str(model_dir))  # the same step config as `trained`: no new compile
    out = vt.train_vqgan(cfg, tmp_path)
    tuned = _params(out)
    assert tuned.keys() == start.keys()
    assert any(not np.array_equal(tuned[k], start[k]) for k in start)
    # A pretrained codebook is kept, not re-drawn from the first batch.
    first = _metrics(tmp_path, "train")[0]
    assert first["restarted"] == 0
    saved = json.loads((tmp_path / vt.CONFIG_NAME).read_text())
    assert saved["init"] == str(model_dir)


def test_config_file_and_overrides(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    vt.add_arguments(parser)
    args = parser.parse_args(["--workdir", str(tmp_path), "--config",
                              f"{REPO}/training/configs/vqgan_shapes.py:tiny", "--data", "shapes:64:3",
                              "num_steps=3", "model.codebook_size=64"])
    cfg = vt.config_from_args(args)
    assert cfg.num_steps == 3 and cfg.model.codebook_size == 64 and cfg.data == "shapes:64:3"
    assert vt.VQGANTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_vqgan_shapes_benchmark_judges_a_larger_vqgan_on_the_canvas(tmp_path, monkeypatch):
    """benchmarks/vqgan_shapes.py on a random 96 px patch-code VQGAN (the cell VQGAN's
    shape): every number it promises comes back; with a reconstruction that returns its
    input, the judge accepts every image, so the enlargement (`shapes.from_canvas`) and
    the judging on the canvas (`shapes.to_canvas`) undo each other."""
    from dalle_mini_jax.config import VQGANConfig

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import vqgan_shapes as bench

    cfg = VQGANConfig(channels=8, channel_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                      z_channels=8, embed_dim=8, codebook_size=16, resolution=96, norm_groups=4,
                      local=True, patch_codes=True)
    VQModel(cfg, rngs=nnx.Rngs(0)).save_pretrained(tmp_path / "model")
    out = bench.benchmark(tmp_path / "model", num=6, failures=True, layout="centred")
    assert out["num_images"] == 6 and out["tokens"] == 9 and out["codebook_size"] == 16
    assert 0.0 <= out["judge_accept"] <= 1.0 and np.isfinite(out["psnr"])
    assert 0.0 <= out["code_consistency"] <= 1.0 and out["background_codes"] >= 1
    assert sum(out["failures"]["kinds"].values()) >= round(6 * (1 - out["judge_accept"]))

    def identity(model, images, batch_size=64):
        return images.copy(), np.zeros((len(images), 9), np.int32)

    monkeypatch.setattr(bench, "reconstruct", identity)
    for layout in ("centred", "free"):
        exact = bench.benchmark(tmp_path / "model", num=6, failures=True, layout=layout)
        assert exact["judge_accept"] == 1.0 and exact["failures"]["kinds"] == {}, layout
