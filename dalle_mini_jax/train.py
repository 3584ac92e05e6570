"""The transformer trainer: `dalle-mini-jax train` and `dalle-mini-jax export`.

    dalle-mini-jax train --config tiny --workdir runs/tiny
    dalle-mini-jax train --config training/configs/shapes.py --workdir runs/shapes \
        --set optimizer.lr=3e-4 steps=5000
    dalle-mini-jax export --workdir runs/shapes [--step N] --out my_model

A work directory holds everything about one run, so the same command resumes it:

    train_config.json   the run's final config (after overrides)
    data/               what the `prepare` hook made (tiny, shapes): shards, tokenizer, VQGAN
    checkpoints/N/      Orbax: params, optimizer state, step, RNG key, data position
    metrics.jsonl       one JSON object per log / eval step (+ TensorBoard if tensorboardX)
    samples/            step_XXXXXXX.png sample grids
    model/              the exported model directory (at the end of the run)

The pieces: `train_config` (what a run is), `train_data` (deterministic batches),
`train_state` (state, optimizer, the pure jitted steps), `train_checkpoint` (Orbax
checkpoints, shared with the VQGAN trainer). This file wires them into a loop and handles
the work directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import train_config as tc
from .config import DalleBartConfig
from .sharding import make_mesh
from .train_checkpoint import Checkpoints
from .train_config import TrainConfig
from .train_data import BatchIterator, DataPosition, EncodedSet, eval_batches, load_encoded, unconditional_tokens
from .train_state import StepFns, TrainState, build, state_from_params, step_rng

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------
# Multi-process
# --------------------------------------------------------------------------------------


def init_distributed(dist: tc.DistributedConfig) -> None:
    """`jax.distributed.initialize` from the config, else from DALLE_* environment variables.

    Does nothing for a single process. Must run before anything touches a JAX device.
    """
    env = os.environ
    address = dist.coordinator_address or env.get("DALLE_COORDINATOR_ADDRESS")
    if not address or jax.distributed.is_initialized():
        return
    num = dist.num_processes if dist.num_processes is not None else env.get("DALLE_NUM_PROCESSES")
    pid = dist.process_id if dist.process_id is not None else env.get("DALLE_PROCESS_ID")
    if num is None or pid is None:
        raise ValueError("a coordinator address needs num_processes and process_id as well "
                         "(config distributed.* or DALLE_NUM_PROCESSES / DALLE_PROCESS_ID)")
    # CPU processes need a collectives backend to talk to each other (ignored on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num), process_id=int(pid))


def _is_main() -> bool:
    return jax.process_index() == 0


def gather_params(params: Any) -> Any:
    """Full host (numpy) copies of sharded params on every process."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return multihost_utils.process_allgather(params, tiled=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------
# Checkpoints (Orbax)
# --------------------------------------------------------------------------------------


def checkpoint_manager(directory: Path, cfg: TrainConfig) -> Checkpoints:
    """The run's checkpoints in WORKDIR/checkpoints (`train_checkpoint`: what a save holds,
    why an async save may overlap the next, donating, step)."""
    return Checkpoints(directory, cfg.keep_checkpoints, async_save=cfg.async_checkpoints)


def save_checkpoint(manager: Checkpoints, step: int, state: TrainState, position: DataPosition) -> None:
    manager.save(step, state, dataclasses.asdict(position))


def restore_checkpoint(manager: Checkpoints, step: int, abstract: TrainState) -> tuple[TrainState, DataPosition]:
    """Restore step `step` straight into the shardings of `abstract` (ShapeDtypeStructs)."""
    state, meta = manager.restore(step, abstract)
    return state, DataPosition(**meta)


# --------------------------------------------------------------------------------------
# Resolving the run's inputs
# --------------------------------------------------------------------------------------


def prepare_data(cfg: TrainConfig, data_dir: Path) -> TrainConfig:
    """Run the config's built-in data preparation (once) and point `cfg.data` at its output.

    "shapes": a shapes image-caption set, a small VQGAN trained on it, a BPE tokenizer
    trained on its captions, and the set encoded to parquet shards, all under `data_dir`.
    """
    if cfg.data.prepare != "shapes":
        raise ValueError(f"data.prepare={cfg.data.prepare!r}: the only built-in preparation is 'shapes'")
    from .train_prepare import prepare_shapes  # noqa: PLC0415

    done = data_dir / "prepared.json"
    if _is_main() and not done.exists():
        prepare_shapes(cfg, data_dir)
    _sync("prepare_data")
    paths = json.loads(done.read_text())
    return cfg.replace(data=dataclasses.replace(cfg.data, **paths))


def resolve_inputs(cfg: TrainConfig, workdir: Path) -> tuple[TrainConfig, DalleBartConfig]:
    """Fill in data paths (prepare hook, --init directory) and the model shape."""
    if cfg.data.train is None and cfg.data.prepare:
        cfg = prepare_data(cfg, workdir / "data")
    if cfg.data.train is None:
        raise ValueError("no training data: set data.train to a glob of encoded parquet shards")
    model_cfg = cfg.model
    data = cfg.data
    if cfg.init is not None:
        init = Path(cfg.init)
        model_cfg = DalleBartConfig.load(init / "config.json")
        if data.tokenizer is None:
            data = dataclasses.replace(data, tokenizer=str(init))
        if data.vqgan is None and model_cfg.vqgan_path is not None:
            data = dataclasses.replace(data, vqgan=str(init / model_cfg.vqgan_path))
    if data.tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer (a directory with the BPE files) or --init")
    return cfg.replace(data=data), model_cfg


def load_tokenizer(cfg: TrainConfig, model_cfg: DalleBartConfig):
    from .text import TextTokenizer  # noqa: PLC0415

    return TextTokenizer.from_pretrained(cfg.data.tokenizer, text_len=model_cfg.text_len,
                                         normalize=model_cfg.normalize_text)


# --------------------------------------------------------------------------------------
# Logging and samples
# --------------------------------------------------------------------------------------


class MetricsWriter:
    """metrics.jsonl in the work directory, and TensorBoard when tensorboardX is installed."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def sample_grid(model, tokenizer, vqgan, cfg: tc.SampleConfig):
    """A PIL grid of sampled images: one row per prompt, `per_prompt` columns.

    Uses the generation pipeline (`pipeline.DalleMini`), so the samples are what
    `dalle-mini-jax generate` would make from the exported model.
    """
    from .pipeline import DalleMini, image_grid  # noqa: PLC0415

    pipe = DalleMini(model, vqgan, tokenizer, name="training")
    images = pipe.generate(list(cfg.prompts), num_images=cfg.per_prompt, seed=cfg.seed,
                           temperature=cfg.temperature, top_k=cfg.top_k, guidance=cfg.condition_scale)
    return image_grid(images, cols=cfg.per_prompt)


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def export_model(params: Any, model_cfg: DalleBartConfig, out: Path, tokenizer=None,
                 vqgan_dir: str | None = None) -> Path:
    """Write a model directory: config.json + flax_model.msgpack + tokenizer + VQGAN.

    The VQGAN directory is copied to `out/vqgan` and named in config.json
    (`vqgan_path = "vqgan"`), so the directory is self-contained.

    Args:
      params: nested dict of host (numpy) parameters.
    """
    from .transformer import DalleBart  # noqa: PLC0415

    out = Path(out)
    if vqgan_dir is not None:
        model_cfg = model_cfg.replace(vqgan_path="vqgan")
        if Path(vqgan_dir).resolve() != (out / "vqgan").resolve():
            shutil.rmtree(out / "vqgan", ignore_errors=True)
            shutil.copytree(vqgan_dir, out / "vqgan")
    abstract = nnx.eval_shape(lambda: DalleBart(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(np.asarray, params))
    model.save_pretrained(out, tokenizer=tokenizer)
    return out


def export(workdir: str | Path, out: str | Path | None = None, step: int | None = None) -> Path:
    """Export checkpoint `step` (default: the latest) of a work directory to a model directory.

    Args:
      workdir: a training work directory (with train_config.json and checkpoints/).
      out: the model directory to write; default WORKDIR/model.
      step: which checkpoint; None = the latest complete one.
    """
    workdir = Path(workdir)
    cfg = tc.read_config(workdir / CONFIG_FILE)
    init_distributed(cfg.distributed)
    cfg, model_cfg = resolve_inputs(cfg, workdir)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tokenizer = load_tokenizer(cfg, model_cfg)
    fns, abstract, _ = _build(cfg, model_cfg, mesh, tokenizer)
    manager = checkpoint_manager(workdir / "checkpoints", cfg)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no complete checkpoint")
        state, _ = restore_checkpoint(manager, step, abstract)
    finally:
        manager.close()
    params = gather_params(state.params)
    out = workdir / "model" if out is None else Path(out)
    if _is_main():
        export_model(params, model_cfg, out, tokenizer, cfg.data.vqgan)
    _sync("export")
    return out


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def evaluate(fns: StepFns, params: Any, data: EncodedSet, cfg: TrainConfig) -> float:
    """Mean validation loss over the (first eval_batches batches of the) validation set."""
    total = np.zeros(2)
    for batch in eval_batches(data, cfg.micro_batch_size, fns.batch_sharding, cfg.eval_batches):
        total += np.asarray(fns.eval_step(params, batch))
    return float(total[0] / max(total[1], 1))


def train(cfg: TrainConfig, workdir: str | Path) -> TrainState:
    """Train (or resume) the run in `workdir`, export WORKDIR/model, return the final state.

    Resumes by itself from the latest complete checkpoint in WORKDIR/checkpoints: the
    parameters, optimizer state, step, RNG and data position all come back, so a
    resumed run ends bitwise equal to an uninterrupted one.
    """
    workdir = Path(workdir)
    init_distributed(cfg.distributed)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, model_cfg = resolve_inputs(cfg, workdir)
    if _is_main():
        tc.save_config(cfg, workdir / CONFIG_FILE)

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tokenizer = load_tokenizer(cfg, model_cfg)
    fns, abstract, init_state = _build(cfg, model_cfg, mesh, tokenizer)
    manager = checkpoint_manager(workdir / "checkpoints", cfg)
    position = DataPosition()
    latest = manager.latest_step()
    if latest is not None:
        state, position = restore_checkpoint(manager, latest, abstract)
        _log(f"resumed from {workdir / 'checkpoints' / str(latest)}")
    elif cfg.init is not None:
        from .transformer import DalleBart  # noqa: PLC0415

        loaded = DalleBart.from_pretrained(cfg.init, dtype=jnp.dtype(cfg.param_dtype), mesh=mesh)
        state = state_from_params(fns, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), cfg.seed)
        del loaded
    else:
        state = init_state()

    train_set = load_encoded(cfg.data.train, tokenizer, model_cfg.image_len, model_cfg.num_image_codes)
    valid_set = (load_encoded(cfg.data.valid, tokenizer, model_cfg.image_len, model_cfg.num_image_codes)
                 if cfg.data.valid else None)
    batches = BatchIterator(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, fns.batch_sharding, position)
    vqgan = _load_vqgan(cfg) if cfg.sample.every and _is_main() else None

    writer = MetricsWriter(workdir, enabled=_is_main())
    start = int(np.asarray(state.step.addressable_data(0)))
    base_rng = np.asarray(state.rng.addressable_data(0))
    tokens_per_example = model_cfg.image_len
    bar = _progress(cfg, start)
    pending: list[dict[str, jax.Array]] = []
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start, cfg.steps):
            batch = next(batches)
            state, metrics = fns.train_step(state, batch, step_rng(base_rng, step))
            pending.append(metrics)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logged = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
                now = time.perf_counter()
                rate = (done - step_last) * cfg.batch_size / (now - t_last)
                logged.update(examples_per_s=rate, tokens_per_s=rate * tokens_per_example, epoch=batches.position.epoch)
                writer.write(done, logged)
                if bar is not None:
                    bar.set_postfix(loss=f"{logged['loss']:.4f}", tok_s=f"{logged['tokens_per_s']:.0f}")
                pending, t_last, step_last = [], now, done
            if bar is not None:
                bar.update(1)
            if valid_set is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                writer.write(done, {"valid_loss": evaluate(fns, state.params, valid_set, cfg)})
            if cfg.sample.every and done % cfg.sample.every == 0:
                _save_samples(cfg, fns, state.params, tokenizer, vqgan, workdir / "samples" / f"step_{done:07d}.png")
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                save_checkpoint(manager, done, state, batches.position)
        if valid_set is not None:
            writer.write(cfg.steps, {"valid_loss": evaluate(fns, state.params, valid_set, cfg)})
        manager.wait_until_finished()
        out = workdir / "model"
        params = gather_params(state.params)
        if _is_main():
            export_model(params, model_cfg, out, tokenizer, cfg.data.vqgan)
        _sync("export")
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        manager.close()
    return state


def _build(cfg: TrainConfig, model_cfg: DalleBartConfig, mesh, tokenizer):
    ids, mask = unconditional_tokens(tokenizer)
    return _build_cached(cfg, model_cfg, mesh, tuple(ids.tolist()), tuple(mask.tolist()))


@functools.lru_cache(maxsize=2)
def _build_cached(cfg, model_cfg, mesh, uncond_ids, uncond_mask):
    # The same run set up again in one process (resume in a notebook, export after
    # train, tests) reuses the compiled steps instead of compiling them again.
    return build(cfg, model_cfg, mesh, (np.asarray(uncond_ids), np.asarray(uncond_mask)))


def _progress(cfg: TrainConfig, start: int):
    if not (cfg.progress and _is_main()):
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _log(msg: str) -> None:
    if _is_main():
        print(msg, file=sys.stderr, flush=True)


def _load_vqgan(cfg: TrainConfig):
    if not cfg.data.vqgan:
        warnings.warn("sample.every is set but no VQGAN (data.vqgan): no sample grids", stacklevel=2)
        return None
    from .pipeline import VQGANDecoder  # noqa: PLC0415

    return VQGANDecoder.from_pretrained(cfg.data.vqgan)


def _save_samples(cfg: TrainConfig, fns: StepFns, params: Any, tokenizer, vqgan, path: Path) -> None:
    host = gather_params(params)  # every process takes part; process 0 samples alone
    if vqgan is None or not _is_main():
        return
    model = nnx.merge(fns.graphdef, jax.tree.map(jnp.asarray, host))
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(model, tokenizer, vqgan, cfg.sample).save(path)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The `train` subcommand's arguments (shared by cli.py and training/train.py)."""
    parser.add_argument("--config", required=True,
                        help=f"built-in ({', '.join(sorted(tc.BUILTIN_CONFIGS))}) or path/to/cfg.py[:variant]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if it has checkpoints)")
    parser.add_argument("--init", default=None, help="model directory to start from (released or ours)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of updates")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set optimizer.lr=1e-3 (repeatable)")
    parser.add_argument("more_overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = tc.apply_overrides(tc.load_config(args.config), list(args.overrides) + list(args.more_overrides))
    if args.init is not None:
        cfg = cfg.replace(init=args.init)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    return cfg


def run_train(args: argparse.Namespace) -> None:
    train(config_from_args(args), args.workdir)
    _log(f"model exported to {Path(args.workdir) / 'model'}")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="training work directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", default=None, help="model directory to write (default: WORKDIR/model)")


def run_export(args: argparse.Namespace) -> None:
    out = export(args.workdir, args.out, args.step)
    _log(f"model exported to {out}")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dalle_mini_jax.train [train] ...` or `python -m dalle_mini_jax.train export ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(prog="dalle-mini-jax export")
        add_export_args(parser)
        run_export(parser.parse_args(argv[1:]))
        return
    if argv[:1] == ["train"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="dalle-mini-jax train")
    add_train_args(parser)
    run_train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
