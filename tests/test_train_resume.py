"""Exact resume: a training process killed with SIGKILL mid-run, restarted with the same
command, ends with bitwise the parameters of an uninterrupted run.

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

import train_testdata as td
from dalle_mini_jax import checkpoint as ckpt

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
