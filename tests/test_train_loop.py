"""The training loop in-process: metrics, validation, sample grid, checkpoints, export,
resume past an incomplete (tmp) checkpoint directory."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import train_testdata as td
from dalle_mini_jax import checkpoint as ckpt
from dalle_mini_jax import train
from dalle_mini_jax.config import DalleBartConfig
from dalle_mini_jax.text import TextTokenizer
from dalle_mini_jax.train_config import SampleConfig
from dalle_mini_jax.transformer import DalleBart
from dalle_mini_jax.vqgan import VQModel


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run on 8 devices, from a model directory (--init) with a tiny VQGAN.

    Starting from a directory exercises fine-tuning, and skips compiling a fresh init
    (the sharded init is covered by test_train.py).
    """
    root = tmp_path_factory.mktemp("loop")
    data = td.make_data(root / "data")
    init = td.make_model_dir(root / "init", td.tiny_run(data).model, data.tokenizer)
    cfg = td.tiny_run(dataclasses.replace(data, tokenizer=None, blank_caption_prob=0.2), init=str(init),
                      steps=4, eval_every=2, checkpoint_every=2, log_every=2,
                      sample=SampleConfig(every=4, prompts=("a red circle", "two blue squares"),
                                          per_prompt=3, condition_scale=3.0, top_k=None))
    work = root / "run"
    state = train.train(cfg, work)
    return cfg, work, jax.device_get(state.params), root


def _released(params, cfg: DalleBartConfig) -> dict:
    model = nnx.merge(nnx.split(nnx.eval_shape(lambda: DalleBart(cfg, rngs=nnx.Rngs(0))))[0], params)
    return model.released_params()


def test_metrics_samples_and_checkpoints(run):
    cfg, work, _, _ = run
    lines = [json.loads(x) for x in (work / train.METRICS_FILE).read_text().splitlines()]
    losses = [x for x in lines if "loss" in x]
    assert [x["step"] for x in losses] == [2, 4]
    assert all(np.isfinite(x["loss"]) and x["tokens_per_s"] > 0 and x["lr"] > 0 for x in losses)
    valid = [x for x in lines if "valid_loss" in x]
    assert [x["step"] for x in valid] == [2, 4] and all(np.isfinite(x["valid_loss"]) for x in valid)
    grid = Image.open(work / "samples" / "step_0000004.png")
    assert grid.size == (3 * 16, 2 * 16)  # per_prompt columns x prompts rows of 16x16 images
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert train.tc.read_config(work / train.CONFIG_FILE).steps == 4


def test_export_is_a_model_directory(run):
    cfg, work, params, _ = run
    out = work / "model"
    config = DalleBartConfig.load(out / "config.json")
    assert config.vqgan_path == "vqgan" and config == DalleBartConfig.load(cfg.init + "/config.json")
    loaded = DalleBart.from_pretrained(out)
    got = loaded.released_params()
    want = _released(params, cfg.model)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # the final params, bitwise
    TextTokenizer.from_pretrained(out, text_len=config.text_len)
    VQModel.from_pretrained(out / "vqgan")
    from dalle_mini_jax.pipeline import DalleMini

    DalleMini.from_pretrained(out, compile_ahead=False)  # what `dalle-mini-jax generate --model` loads


def test_export_of_an_earlier_step(run, tmp_path):
    cfg, work, params, _ = run
    out = train.export(work, tmp_path / "step2", step=2)
    at2 = ckpt.read_msgpack(out / ckpt.MSGPACK_NAME)
    final = _released(params, cfg.model)
    assert at2.keys() == final.keys()
    assert any(not np.array_equal(at2[k], final[k]) for k in final)
    assert (out / "vqgan" / "config.json").exists() and (out / "tokenizer.json").exists()


def test_resume_ignores_an_incomplete_checkpoint(run, capfd):
    """A save killed midway leaves `N.orbax-checkpoint-tmp-*`: resume takes the last complete one.

    Checkpoint 4 is replaced by such a directory; the rerun resumes from 2 and ends with
    exactly the parameters of the uninterrupted run.
    """
    cfg, work, params, _ = run
    ckpts = work / "checkpoints"
    shutil.rmtree(ckpts / "4")
    fake = ckpts / "4.orbax-checkpoint-tmp-1700000000"
    (fake / "state").mkdir(parents=True)
    (fake / "state" / "garbage").write_bytes(b"\x00half a checkpoint")
    state = train.train(cfg, work)
    assert f"resumed from {ckpts / '2'}" in capfd.readouterr().err
    assert int(state.step) == 4 and (ckpts / "4" / "state").is_dir()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)
