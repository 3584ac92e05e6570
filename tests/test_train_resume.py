"""Exact resume: a training process killed with SIGKILL mid-run, restarted with the same
command, ends with bitwise the parameters of an uninterrupted run; and the checkpoints it
resumes from (`train_checkpoint`).

Why it can be exact: the data order is a function of (seed, epoch), the step RNG of
(seed, step), and the checkpoint holds parameters, optimizer state, step and the data
position; the same compiled step then replays the same float operations. The three
processes share a persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import train_testdata as td
from jax.sharding import NamedSharding, PartitionSpec as P

from dalle_mini_jax import checkpoint as ckpt
from dalle_mini_jax.train_checkpoint import Checkpoints

STEPS = 32
TIMEOUT = 300


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",  # a 2-device mesh: sharded state
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _command(workdir: Path, init: Path, data) -> list[str]:
    return [
        sys.executable, "-m", "dalle_mini_jax.train", "--config", "tiny", "--workdir", str(workdir),
        "--init", str(init), "--steps", str(STEPS),
        "--set", "data.prepare=None", f"data.train={data.train}", "data.valid=None",
        "batch_size=8", "checkpoint_every=4", "log_every=4", "progress=false", "async_checkpoints=true",
        "data.blank_caption_prob=0.3", "optimizer.warmup_steps=5", "optimizer.lr=3e-3",
    ]


def _complete_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigkill_then_resume_is_bitwise_exact(tmp_path):
    data = td.make_data(tmp_path / "data", num_train=48)  # 6 batches an epoch: the run crosses epochs
    init = td.make_model_dir(tmp_path / "init", td.tiny_run(data).model, data.tokenizer)
    env = _env(tmp_path / "jax_cache")
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    # 1. Start, wait for the first complete checkpoint, kill -9 while it trains on.
    proc = subprocess.Popen(_command(killed, init, data), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + TIMEOUT
    while not _complete_steps(killed):
        assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    at_kill = _complete_steps(killed)
    assert at_kill and at_kill[-1] < STEPS and not (killed / "model").exists(), at_kill

    # 2. The same command again resumes from the latest complete checkpoint and finishes.
    out = subprocess.run(_command(killed, init, data), env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]
    resumed = [line for line in out.stderr.splitlines() if line.startswith("resumed from")]
    assert resumed and int(Path(resumed[0].split()[-1]).name) >= at_kill[-1], out.stderr[-2000:]

    # 3. An uninterrupted run of the same steps.
    out = subprocess.run(_command(whole, init, data), env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]

    a = ckpt.read_msgpack(killed / "model" / ckpt.MSGPACK_NAME)
    b = ckpt.read_msgpack(whole / "model" / ckpt.MSGPACK_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs after resume"
    first = ckpt.read_msgpack(init / ckpt.MSGPACK_NAME)
    assert any(first[k].tobytes() != a[k].tobytes() for k in a)  # it did train


# --------------------------------------------------------------------------------------
# train_checkpoint.Checkpoints
# --------------------------------------------------------------------------------------


def _sharded_state(value: float) -> dict[str, jax.Array]:
    """A state like a train state's: a big array split over the 8 test devices, a scalar."""
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    big = jnp.full((1024, 1024), value, jnp.float32)  # 4 MB: the write takes a while
    return {"params": jax.device_put(big, NamedSharding(mesh, P("fsdp"))),
            "step": jax.device_put(jnp.int32(value), NamedSharding(mesh, P()))}


def test_async_save_survives_the_next_step_donating_the_state(tmp_path):
    """The risk: the train step donates the state an async save is still writing.
    `save` returns only after the arrays are on the host, so the checkpoint holds the
    state as it was (train_checkpoint docstring)."""
    state = _sharded_state(1.0)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    step = jax.jit(lambda s: jax.tree.map(lambda a: a * 3 + 1, s), in_shardings=(shardings,),
                   out_shardings=shardings, donate_argnums=0)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    manager = Checkpoints(tmp_path, keep=3, async_save=True)
    try:
        manager.save(1, state, {"epoch": 0, "index": 7})
        saved = state
        for _ in range(5):  # overwrite what the background save may still be reading
            state = step(state)
        assert saved["params"].is_deleted()
        manager.wait_until_finished()
        restored, meta = manager.restore(1, abstract)
    finally:
        manager.close()
    assert meta == {"epoch": 0, "index": 7}
    np.testing.assert_array_equal(np.asarray(restored["params"]), np.ones((1024, 1024), np.float32))
    assert int(restored["step"]) == 1 and restored["params"].sharding == abstract["params"].sharding


def test_saving_a_step_twice_keeps_the_first(tmp_path):
    manager = Checkpoints(tmp_path, keep=2)
    manager.save(2, _sharded_state(1.0), {"n": 1})
    manager.save(2, _sharded_state(5.0), {"n": 2})  # the final save at a checkpoint_every step
    state, meta = manager.restore(manager.latest_step(), None)
    manager.close()
    assert meta == {"n": 1} and int(state["step"]) == 1


def test_restore_reads_checkpoints_that_name_the_json_item_data(tmp_path):
    """Transformer checkpoints written before `train_checkpoint` call the JSON item "data"."""
    import orbax.checkpoint as ocp

    state = _sharded_state(2.0)
    old = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    old.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave({"epoch": 1, "index": 3})))
    old.close()
    manager = Checkpoints(tmp_path, keep=3)
    restored, meta = manager.restore(manager.latest_step(), state)
    manager.save(8, restored, meta)  # a resumed run writes the new name
    manager.close()
    assert meta == {"epoch": 1, "index": 3}
    np.testing.assert_array_equal(np.asarray(restored["params"]), np.asarray(state["params"]))
    assert sorted(p.name for p in (tmp_path / "8").iterdir() if p.is_dir()) == ["meta", "state"]
