"""Train (or fine-tune) a VQGAN: reconstruction + vector-quantization losses, dead-code restarts.

    python training/train_vqgan.py --workdir runs/vqgan [--config FILE.py[:variant]]
        [--init VQGAN_DIR] [--data SRC] [key=value ...]
    (also `dalle-mini-jax train-vqgan`, same flags)

What one step does (`train_step`, pure and jitted, the state donated):
  images -> encoder -> latents z [B, h, w, D] (l2-normalised when `l2_normalize`)
  -> nearest code e (straight-through) -> decoder -> reconstruction
  loss = l1_weight * |x - x'| + l2_weight * (x - x')^2 + edge_weight * (dx - dx')^2
         + beta * |z - sg(e)|^2   (dx: differences of neighbouring pixels, both axes)
         (+ |sg(z) - e|^2 when the codebook learns by gradient, `codebook="loss"`)
Then the codebook moves: with `codebook="ema"` each code becomes the (EMA) mean of the
latents assigned to it (renormalised in l2 mode), which trains much faster than a codebook
loss when only a few thousand steps fit. Every `restart_every` steps a code whose usage EMA
fell below `dead_threshold` x the mean usage is restarted from a random latent of the
current batch; at step 0 every code starts that way (`init_codebook_from_data`): the
codebook begins where the data is (a first-batch k-means init without iterations), not
in the corner of a random init that only a few latents ever reach.

The learning rate is an argument of the step: linear warmup, then a cosine that ends at
`num_steps` or, with `time_budget_s`, when the wall-time budget runs out (counted from the
end of the first step, so a slow compile does not use up the high-LR phase).

Why l2-normalised codes work with the unchanged `VQModel.encode`: when every codebook row
has unit norm, argmin_k |z - e_k|^2 = argmax_k z.e_k = the nearest code of z/|z|, so the
released-format model's own encoder picks the code training picked. The stored codebook is
therefore kept exactly unit-norm after every step.

No perceptual or adversarial term: no pretrained perceptual network is available offline,
flat-colour data such as the shapes set needs neither, and a PatchGAN discriminator
(possible offline) is not implemented yet.

Single device: the batch is small and the model tiny; a mesh would only add overhead on a
CPU. (`VQModel` carries logical axis names, so sharding the batch is a later change.)

The work directory holds:
  checkpoints/        Orbax, every `checkpoint_every` steps and at the end (keep N); a rerun
                      with the same workdir resumes from the latest: params, optimizer state,
                      codebook EMA statistics, step, RNG and the data position.
  metrics.jsonl       one JSON object per line: train metrics every `log_every` steps,
                      held-out eval (PSNR, codebook usage, judge acceptance for shapes).
  vqgan_train_config.json   the config of the run.
  model/              the exported VQGAN directory (`VQModel.from_pretrained` loads it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dalle_mini_jax.config import VQGAN_PRESETS, VQGANConfig
from dalle_mini_jax.encode import open_source
from dalle_mini_jax.train_checkpoint import Checkpoints
from dalle_mini_jax.vqgan import VQModel

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "vqgan_train_config.json"
MODEL_DIR = "model"


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig:
    """One VQGAN training run (see the module docstring for the loss)."""

    model: VQGANConfig = VQGAN_PRESETS["shapes"]  # shape of a new VQGAN; --init's config.json replaces it
    init: str | None = None  # VQGAN model directory to fine-tune from; None: from scratch
    # Training images: `shapes[:N[:SEED]]` (the built-in set drawn on the fly; no N =
    # endless) or any `data.open_dataset` source (folder, metadata folder, parquet, ...).
    data: str = "shapes"
    # Held-out images for PSNR / codebook usage (and the judge, for shapes): a source as
    # above, finite. None: the first `eval_size` images of `data` (then not held out).
    eval_data: str | None = "shapes:256:1"
    eval_size: int = 256  # eval images used at most
    seed: int = 0  # parameter init, code restarts and the data order derive from it
    num_steps: int = 2000  # optimizer updates (the length of the LR schedule too)
    time_budget_s: float = 0.0  # wall-time budget: LR decay ends and training stops (then export) by it; 0: none
    batch_size: int = 16  # images per update
    learning_rate: float = 1e-3  # peak Adam LR
    warmup_steps: int = 100  # linear warmup from 0
    end_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak at num_steps
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.99  # Adam second-moment decay (0.99: adapts fast in short runs)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    l1_weight: float = 1.0  # mean |x - x'| in [0, 1] pixel units: keeps flat colours and edges sharp
    l2_weight: float = 0.0  # mean (x - x')^2
    # mean squared error of neighbouring-pixel differences (both axes; "gradient difference
    # loss"): weights high-frequency error up, i.e. edges and thin gaps, which L2 over
    # mostly-flat images underweights. 0: off.
    edge_weight: float = 0.0
    beta: float = 0.25  # commitment cost: pulls latents towards their codes
    codebook: str = "ema"  # "ema": codes are EMA means of their latents; "loss": learnt by gradient
    ema_decay: float = 0.99  # decay of the code usage / latent-sum EMAs
    # Polyak average of all parameters (codebook included), evaluated and exported instead
    # of the raw ones; its decay warms up as min(param_ema, (1 + t) / (10 + t)). 0: off.
    param_ema: float = 0.0
    l2_normalize: bool = True  # unit-norm latents and codes (cosine-similarity lookup)
    init_codebook_from_data: bool = True  # step 0 sets every code to a latent of the first batch (not with init)
    restart_every: int = 50  # check for dead codes every N steps; 0 never restarts
    dead_threshold: float = 0.03  # dead: usage EMA below this fraction of the mean usage
    # Which batch latents restarted codes are drawn from: "random" (uniform) or "error"
    # (probability proportional to the squared distance to their nearest code, as k-means++
    # seeds). Uniform draws put most restarts on the commonest latents (black background
    # on shapes), where they split one well-served cluster by tiny differences of context.
    restart_from: str = "random"
    shuffle_window: int = 1024  # examples read and shuffled together (per epoch, seeded)
    log_every: int = 50  # train metrics every N steps (averaged over them)
    eval_every: int = 500  # held-out eval every N steps (and at the end); 0: at the end only
    checkpoint_every: int = 500  # Orbax checkpoint every N steps (and at the end); 0: end only
    keep_checkpoints: int = 3  # checkpoints kept in WORKDIR/checkpoints
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        if self.codebook not in ("ema", "loss"):
            raise ValueError(f"codebook={self.codebook!r}: choose 'ema' or 'loss'")
        if self.restart_from not in ("random", "error"):
            raise ValueError(f"restart_from={self.restart_from!r}: choose 'random' or 'error'")
        if not 0.0 <= self.param_ema < 1.0:
            raise ValueError(f"param_ema must be in [0, 1), got {self.param_ema}")
        for name in ("l1_weight", "l2_weight", "edge_weight", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_steps", "batch_size", "eval_size", "shuffle_window", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **changes) -> "VQGANTrainConfig":
        return dataclasses.replace(self, **changes)

    def step_config(self) -> "VQGANTrainConfig":
        """This config with every field the train step does not read set to its default.

        It is the static argument of `jitted_train_step` (and the key of
        `make_optimizer`), so runs that differ only in data, logging or init share a
        compile.
        """
        default = VQGANTrainConfig()
        return self.replace(**{name: getattr(default, name) for name in _NOT_IN_STEP})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANTrainConfig":
        d = dict(d)
        if isinstance(d.get("model"), dict):
            d["model"] = VQGANConfig(**d["model"])
        return cls(**d)


# Fields that do not change what `train_step` computes (see `step_config`).
_NOT_IN_STEP = ("init", "data", "eval_data", "eval_size", "time_budget_s", "shuffle_window",
                "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "progress")


def tiny_config() -> VQGANTrainConfig:
    """Seconds on a CPU: the tiny VQGAN (16x16 images, 4x4 tokens) on shapes, for tests."""
    return VQGANTrainConfig(
        model=VQGAN_PRESETS["tiny"], eval_data="shapes:32:1", eval_size=32, num_steps=20,
        batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=5, eval_every=0,
        checkpoint_every=0, restart_every=5, progress=False)


def shapes_config() -> VQGANTrainConfig:
    """The bundled shapes VQGAN: 20 minutes on a 2-core CPU (training/configs/vqgan_shapes.py)."""
    return VQGANTrainConfig(
        # 2,048 codes, not the preset's 1,024: the rare patches that hold two objects' edges
        # (1-pixel gaps, two colours) get codes of their own (judge 99.3 % vs 98.9 %).
        model=VQGAN_PRESETS["shapes"].replace(local=True, codebook_size=2048), restart_from="error",
        data="shapes", eval_data="shapes:256:1",
        batch_size=8, learning_rate=1.5e-3, warmup_steps=50, num_steps=100_000,
        # 19 minutes: the final eval and the export fit in the 20th.
        time_budget_s=1140, l1_weight=0.0, l2_weight=1.0, l2_normalize=False,
        param_ema=0.998, eval_every=500, checkpoint_every=500)


BUILTIN_CONFIGS = {"tiny": tiny_config, "shapes": shapes_config}


def load_config(spec: str) -> VQGANTrainConfig:
    """A built-in name (`tiny`, `shapes`) or `path/to/config.py[:variant]` whose
    `get_config(variant)` returns a `VQGANTrainConfig`."""
    if spec in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[spec]()
    path, _, variant = spec.partition(":")
    if not path.endswith(".py") or not Path(path).is_file():
        raise ValueError(f"--config {spec!r} is neither a built-in ({', '.join(BUILTIN_CONFIGS)}) "
                         "nor an existing .py file (optionally followed by :variant)")
    module_spec = importlib.util.spec_from_file_location(f"_vqgan_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(variant or None)
    if not isinstance(cfg, VQGANTrainConfig):
        raise ValueError(f"{path}: get_config returned {type(cfg).__name__}, not a VQGANTrainConfig")
    return cfg


# --------------------------------------------------------------------------------------
# Train state and the pure train step
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; what a checkpoint holds (with the data position).

    Attributes:
      step: int32 [], updates done.
      params: the VQModel's nnx.State (codebook included).
      opt_state: optax state of `params`.
      usage: float32 [K], EMA of how many latents each code received per step.
      code_sum: float32 [K, D], EMA of the sum of the latents each code received.
      rng: uint32 [2], the key restarts draw from (split every step).
      ema_params: the Polyak average of `params` (`param_ema` > 0), else None.
    """

    step: jax.Array
    params: nnx.State
    opt_state: Any
    usage: jax.Array
    code_sum: jax.Array
    rng: jax.Array
    ema_params: nnx.State | None = None

    def eval_params(self) -> nnx.State:
        """The parameters to evaluate and export: the average when there is one."""
        return self.params if self.ema_params is None else self.ema_params


@functools.lru_cache(maxsize=16)
def make_optimizer(cfg: VQGANTrainConfig) -> optax.GradientTransformation:
    """Adam (+ decoupled weight decay) after global-norm clipping, *without* the step size.

    The learning rate is an argument of `train_step` (`learning_rate_at`), so a run with a
    time budget can decay it by elapsed time. Cached per config, so runs with one config
    hand `jitted_train_step` the same object and hit its compile cache.
    """
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    return optax.chain(*parts)


def learning_rate_at(cfg: VQGANTrainConfig, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, times a cosine from 1 to `end_lr_ratio`.

    Args:
      step: updates done.
      progress: fraction of the run done, in [0, 1]: step / num_steps, or with a time
        budget the larger of that and elapsed / budget, so the decay ends when time does.
    """
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.learning_rate * warm * (cfg.end_lr_ratio + (1.0 - cfg.end_lr_ratio) * cosine)


def _normalize(x: jax.Array) -> jax.Array:
    """x / |x| over the last axis (eps keeps a zero vector finite)."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def _edge_error(recon: jax.Array, x: jax.Array) -> jax.Array:
    """Mean squared error of neighbouring-pixel differences of recon vs x [B, H, W, C].

    An error e at one isolated pixel (one wrongly lit in a one-pixel gap between two
    objects) costs e^2 in the L2 mean and 2 e^2 here (it differs from all four
    neighbours); an error shared by a whole flat region costs nothing here. So the term
    weights up exactly the errors that join objects or round corners.
    """
    err = recon - x
    dy = err[:, 1:] - err[:, :-1]
    dx = err[:, :, 1:] - err[:, :, :-1]
    return 0.5 * (jnp.mean(jnp.square(dy)) + jnp.mean(jnp.square(dx)))


def _set_codebook(graphdef, params: nnx.State, codebook: jax.Array) -> nnx.State:
    """`params` with the codebook table [K, D] replaced (traceable)."""
    model = nnx.merge(graphdef, params)
    model.quantize.embedding.embedding.value = codebook
    return nnx.state(model)


def init_state(model: VQModel, cfg: VQGANTrainConfig, tx: optax.GradientTransformation,
               *, fresh: bool) -> tuple[Any, TrainState]:
    """(graphdef, state) of a model about to be trained.

    Args:
      model: the VQGAN (new, or loaded for fine-tuning).
      fresh: True for a new model: every code's usage starts at 0 (so, with
        `init_codebook_from_data`, step 0 replaces them all by data). False (fine-tuning):
        codes start as used as the mean, so a pretrained codebook is kept.
    """
    graphdef, params = nnx.split(model)
    codebook = model.quantize.codebook.astype(jnp.float32)
    if cfg.l2_normalize:
        codebook = _normalize(codebook)
        params = _set_codebook(graphdef, params, codebook.astype(model.quantize.codebook.dtype))
    k = codebook.shape[0]
    mean_usage = cfg.batch_size * model.config.num_tokens / k
    usage = jnp.zeros((k,), jnp.float32) if fresh else jnp.full((k,), mean_usage, jnp.float32)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), usage=usage,
        code_sum=codebook * usage[:, None], rng=jax.random.PRNGKey(cfg.seed + 1),
        ema_params=jax.tree.map(jnp.copy, params) if cfg.param_ema else None)
    return graphdef, state


def train_step(state: TrainState, images: jax.Array, learning_rate: jax.Array, *, graphdef, tx,
               cfg: VQGANTrainConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. Pure: jit it with `graphdef, tx, cfg` static (`jitted_train_step`).

    Args:
      state: the train state (donated by `jitted_train_step`).
      images: uint8 [B, R, R, 3].
      learning_rate: float32 [], this step's size (`learning_rate_at`).

    Returns:
      (new state, metrics): float32 scalars loss, l1, l2, edge, commitment, codebook_loss,
      perplexity (of this batch's code use), codes_used (fraction of codes used by this
      batch), restarted (codes restarted this step), grad_norm.
    """
    x = images.astype(jnp.float32) / 255.0
    rng, restart_rng = jax.random.split(state.rng)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        z = model.encode_latents(x).astype(jnp.float32)
        codebook = model.quantize.codebook.astype(jnp.float32)
        if cfg.l2_normalize:
            z = _normalize(z)
            codebook = _normalize(codebook)  # no-op on the stored (unit) rows; keeps grads on the sphere
        if cfg.codebook == "ema":
            codebook = jax.lax.stop_gradient(codebook)
        # The model's own nearest-code search (float32): in l2 mode the stored rows are
        # unit-norm, so it picks the code of z / |z| (module docstring).
        indices = model.quantize.nearest(z)
        e = codebook[indices]
        z_q = z + jax.lax.stop_gradient(e - z)  # straight-through
        recon = model.decode(z_q)
        l1 = jnp.mean(jnp.abs(recon - x))
        l2 = jnp.mean(jnp.square(recon - x))
        commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
        edge = _edge_error(recon, x)
        loss = (cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.edge_weight * edge
                + cfg.beta * commitment)
        if cfg.codebook == "loss":
            loss = loss + codebook_loss
        aux = dict(l1=l1, l2=l2, edge=edge, commitment=commitment, codebook_loss=codebook_loss)
        return loss, (aux, jax.lax.stop_gradient(z), indices)

    (loss, (metrics, z, indices)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    params = optax.apply_updates(state.params, updates)

    # ---- the codebook: EMA statistics, then restarts of dead codes ---------------------
    old = nnx.merge(graphdef, params).quantize.codebook
    k, d = old.shape
    flat = z.reshape(-1, d)
    idx = indices.reshape(-1)
    counts = jnp.bincount(idx, length=k).astype(jnp.float32)
    sums = jax.ops.segment_sum(flat, idx, num_segments=k)
    decay = cfg.ema_decay
    usage = decay * state.usage + (1 - decay) * counts
    code_sum = decay * state.code_sum + (1 - decay) * sums
    codebook = old.astype(jnp.float32)
    if cfg.codebook == "ema":
        mean = code_sum / jnp.maximum(usage, 1e-12)[:, None]
        codebook = jnp.where((usage > 0)[:, None], mean, codebook)
    if cfg.l2_normalize:
        codebook = _normalize(codebook)

    mean_usage = flat.shape[0] / k
    check = (cfg.restart_every > 0) & (state.step % max(cfg.restart_every, 1) == 0)
    dead = check & (usage < cfg.dead_threshold * mean_usage)
    if cfg.init_codebook_from_data:
        # `usage` is all zeros only for a fresh model before its first step.
        dead = dead | ((state.step == 0) & jnp.all(state.usage == 0))
    if cfg.restart_from == "error":
        # k-means++ seeding: latents far from every code are where new codes help; a tiny
        # floor keeps the draw defined when every latent sits on its code.
        err = jnp.sum(jnp.square(flat - old.astype(jnp.float32)[idx]), axis=1) + 1e-12
        pick = jax.random.choice(restart_rng, flat.shape[0], (k,), p=err / jnp.sum(err))
    elif flat.shape[0] >= k:  # distinct latents (with replacement only if K > B*h*w)
        pick = jax.random.permutation(restart_rng, flat.shape[0])[:k]
    else:
        pick = jax.random.randint(restart_rng, (k,), 0, flat.shape[0])
    fresh = flat[pick]
    codebook = jnp.where(dead[:, None], fresh, codebook)
    # A restarted code gets a small usage: it must win latents within ~70 steps (at decay
    # 0.99) or it is restarted again; its sum agrees with its new value.
    restart_usage = 2 * cfg.dead_threshold * mean_usage
    usage = jnp.where(dead, restart_usage, usage)
    code_sum = jnp.where(dead[:, None], codebook * usage[:, None], code_sum)
    params = _set_codebook(graphdef, params, codebook.astype(old.dtype))

    ema_params = None
    if cfg.param_ema:
        # Averaged after the codebook update, so the averaged encoder, codebook and decoder
        # move together. The warm-up keeps the random init from lingering in the average.
        t = state.step.astype(jnp.float32)
        d = jnp.minimum(cfg.param_ema, (1.0 + t) / (10.0 + t))
        ema_params = jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(p.dtype),
                                  state.ema_params, params)

    probs = counts / flat.shape[0]
    metrics = dict(
        metrics, loss=loss,
        perplexity=jnp.exp(-jnp.sum(probs * jnp.log(jnp.where(probs > 0, probs, 1.0)))),
        codes_used=jnp.mean(counts > 0), restarted=jnp.sum(dead).astype(jnp.float32),
        grad_norm=optax.global_norm(grads))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           usage=usage, code_sum=code_sum, rng=rng, ema_params=ema_params)
    return new_state, metrics


# graphdef, tx and cfg are hashable and static: one compile per (model shape, config).
jitted_train_step = jax.jit(train_step, static_argnames=("graphdef", "tx", "cfg"),
                            donate_argnums=0)


# --------------------------------------------------------------------------------------
# Data: deterministic, resumable batches
# --------------------------------------------------------------------------------------


class BatchStream:
    """Endless batches of uint8 [B, R, R, 3] images from a source, cycling over epochs.

    Examples are read in windows of `shuffle_window` and shuffled within a window with
    `default_rng((seed, epoch, window start index))`. The position after each batch is
    `{"epoch", "index", "offset"}`: the window's first stable index and how many of its
    examples were used, so a resumed stream re-reads that window and continues exactly
    (earlier examples are passed over unread, `iterate(start_index=...)`).
    A background thread prepares the next batches while the model trains.
    """

    def __init__(self, source: str, resolution: int, batch_size: int, *, seed: int,
                 shuffle_window: int, position: dict[str, int] | None = None,
                 prefetch: int = 2):
        self.src = open_source(source, resolution)
        self.batch_size = batch_size
        self.resolution = resolution
        self.seed = seed
        self.window = shuffle_window
        self.position = dict(position or {"epoch": 0, "index": 0, "offset": 0})
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="vqgan-batches")
        self._thread.start()

    def _examples(self) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        epoch, start, offset = (self.position[k] for k in ("epoch", "index", "offset"))
        while True:
            it = self.src.iterate(start_index=start)
            any_in_epoch = start > 0
            while True:
                window = list(itertools.islice(it, self.window))
                if not window:
                    break
                any_in_epoch = True
                next_start = window[-1].index + 1
                order = np.random.default_rng((self.seed, epoch, start)).permutation(len(window))
                for k in range(offset, len(window)):
                    after = ({"epoch": epoch, "index": start, "offset": k + 1}
                             if k + 1 < len(window) else
                             {"epoch": epoch, "index": next_start, "offset": 0})
                    yield window[order[k]].image, after
                start, offset = next_start, 0
            if not any_in_epoch:
                raise ValueError(f"{self.src.summary()}\nno usable training images")
            epoch, start, offset = epoch + 1, 0, 0

    def _fill(self) -> None:
        try:
            examples = self._examples()
            while not self._stop.is_set():
                images = np.empty((self.batch_size, self.resolution, self.resolution, 3), np.uint8)
                for i in range(self.batch_size):
                    images[i], after = next(examples)
                self._put((images, after))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __next__(self) -> np.ndarray:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        images, self.position = item
        return images

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def load_eval_images(cfg: VQGANTrainConfig, resolution: int) -> tuple[np.ndarray, list[str]]:
    """The held-out images: uint8 [N, R, R, 3] and their captions (N <= eval_size)."""
    src = open_source(cfg.eval_data or cfg.data, resolution)
    examples = list(itertools.islice(src.iterate(), cfg.eval_size))
    if not examples:
        raise ValueError(f"no usable eval images in {cfg.eval_data or cfg.data}")
    return np.stack([e.image for e in examples]), [e.caption for e in examples]


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="graphdef")
def reconstruct_batch(params: nnx.State, images: jax.Array, *, graphdef
                      ) -> tuple[jax.Array, jax.Array]:
    """Encode and decode through the model's own `encode` / `decode_code`, as inference runs.

    Args:
      params: the VQModel state; graphdef: its graph (static).
      images: uint8 [B, R, R, 3].

    Returns:
      (uint8 [B, R, R, 3] reconstructions, int32 [B, S] codes).
    """
    model = nnx.merge(graphdef, params)
    codes = model.encode(images.astype(jnp.float32) / 255.0)
    pixels = model.decode_code(codes)
    return jnp.round(pixels * 255.0).astype(jnp.uint8), codes


def psnr(images: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 [N, H, W, 3] pairs (capped at 99 for exact copies)."""
    err = np.mean((images.astype(np.float64) - recon.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return np.minimum(10 * np.log10(255.0**2 / np.maximum(err, 1e-12)), 99.0)


def reconstruct(model: VQModel, images: np.ndarray, batch_size: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """`reconstruct_batch` over N images: (uint8 [N, R, R, 3], int32 [N, S] codes).

    `batch_size` images per jitted call; the last batch is padded, so one compile serves.
    """
    graphdef, params = nnx.split(model)
    recons, codes = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.uint8)
        r, c = reconstruct_batch(params, np.concatenate([chunk, pad]), graphdef=graphdef)
        recons.append(np.asarray(r)[:len(chunk)])
        codes.append(np.asarray(c)[:len(chunk)])
    return np.concatenate(recons), np.concatenate(codes)


def reconstruction_metrics(model: VQModel, images: np.ndarray, captions: list[str] | None,
                           batch_size: int = 64) -> dict[str, float]:
    """Held-out PSNR, codebook usage and (shapes captions) judge acceptance.

    Args:
      model: the VQGAN.
      images: uint8 [N, R, R, 3]; captions: N captions, or None.
      batch_size: images per jitted call (`reconstruct`).

    Returns:
      `metrics_of` the reconstructions.
    """
    recon, codes = reconstruct(model, images, batch_size)
    return metrics_of(images, recon, codes, model.config.codebook_size, captions)


def metrics_of(images: np.ndarray, recon: np.ndarray, codes: np.ndarray, codebook_size: int,
               captions: list[str] | None) -> dict[str, float]:
    """psnr (mean dB), codebook_usage (fraction of codes used on these images), perplexity
    (of the code histogram), and judge_accept when the captions are shapes captions and
    the images at least 64x64, of reconstructions `recon` [N, R, R, 3] with codes [N, S]."""
    counts = np.bincount(codes.reshape(-1), minlength=codebook_size)
    probs = counts / counts.sum()
    out = {
        "psnr": float(psnr(images, recon).mean()),
        "codebook_usage": float(np.mean(counts > 0)),
        "perplexity": float(np.exp(-np.sum(probs[probs > 0] * np.log(probs[probs > 0])))),
    }
    if captions is not None and images.shape[1] >= 64:
        from dalle_mini_jax import evaluate, shapes

        try:
            specs = [shapes.parse_caption(c) for c in captions]
        except ValueError:
            specs = None  # not shapes captions: the judge does not apply
        if specs is not None:
            # A VQGAN drawing at a larger side (the cell VQGAN's 96) is judged on the
            # canvas its training images were enlarged from (`shapes.from_canvas`).
            out["judge_accept"] = float(evaluate.judge_batch(shapes.to_canvas(recon), specs).mean())
    return out


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def _build_model(cfg: VQGANTrainConfig) -> tuple[VQModel, VQGANTrainConfig, bool]:
    """(model, cfg with the model's actual config, fresh?)"""
    if cfg.init:
        model = VQModel.from_pretrained(cfg.init)
        return model, cfg.replace(model=model.config), False
    return new_model(cfg.model, cfg.seed), cfg, True


def new_model(config: VQGANConfig, seed: int) -> VQModel:
    """A freshly initialised VQModel, its initialisers run as one jitted program (op by
    op, each of the ~100 initialisers would compile on its own), compiled once per config."""
    graphdef, init = _initializer(config)
    return nnx.merge(graphdef, init(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _initializer(config: VQGANConfig):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VQModel(config, rngs=nnx.Rngs(0))))
    return graphdef, jax.jit(lambda key: nnx.split(VQModel(config, rngs=nnx.Rngs(key)))[1])


def _score(metrics: dict[str, float]) -> tuple[float, float]:
    """Held-out quality for choosing between parameter sets: judge acceptance, then PSNR."""
    return metrics.get("judge_accept", 0.0), metrics["psnr"]


def _log_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_vqgan(cfg: VQGANTrainConfig, workdir: str | Path, *,
                stop_at_step: int | None = None) -> Path | None:
    """Train a VQGAN in `workdir`, resuming from its latest checkpoint, and export it.

    Args:
      cfg: the run.
      workdir: work directory (module docstring); created if needed.
      stop_at_step: stop after this step with a checkpoint and no export, as an
        interruption would (tests; splitting a run across sessions).

    Returns:
      WORKDIR/model, the exported VQGAN directory; None when stopped by `stop_at_step`.
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start_time = time.time()
    model, cfg, fresh = _build_model(cfg)
    (workdir / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    step_cfg = cfg.step_config()
    tx = make_optimizer(step_cfg)
    graphdef, state = init_state(model, cfg, tx, fresh=fresh)
    # Committed to one device like a restored state, so a resumed run in this process
    # hits the same compiled step.
    state = jax.device_put(state, jax.devices()[0])
    del model
    # Synchronous saves: the state is a few MB, a background save would gain nothing.
    ckpt = Checkpoints(workdir / CHECKPOINT_DIR, cfg.keep_checkpoints)
    meta: dict[str, Any] = {"position": None, "train_seconds": 0.0, "cpu_seconds": 0.0,
                            "budget_start": None}
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        logger.info("resumed from step %d", int(state.step))
    step = int(state.step)
    resolution = cfg.model.resolution
    metrics_path = workdir / METRICS_NAME
    eval_images, eval_captions = load_eval_images(cfg, resolution)
    step_fn = functools.partial(jitted_train_step, graphdef=graphdef, tx=tx, cfg=step_cfg)
    stream = BatchStream(cfg.data, resolution, cfg.batch_size, seed=cfg.seed,
                         shuffle_window=cfg.shuffle_window, position=meta["position"])
    previous_seconds = float(meta["train_seconds"])
    # CPU seconds of this process (all its threads): on a shared machine the wall time
    # says little about the compute a run needed.
    previous_cpu = float(meta.get("cpu_seconds", 0.0)) - time.process_time()

    def elapsed() -> float:
        return previous_seconds + time.time() - start_time

    def cpu_seconds() -> float:
        return round(previous_cpu + time.process_time(), 1)

    def save():
        ckpt.save(step, state, {"position": stream.position, "train_seconds": elapsed(),
                                "cpu_seconds": cpu_seconds(), "budget_start": budget_start})

    def evaluate_now(params=None, **extra):
        params = state.eval_params() if params is None else params
        out = reconstruction_metrics(nnx.merge(graphdef, params), eval_images, eval_captions)
        _log_metrics(metrics_path, {"step": step, "split": "eval", **out, **extra,
                                    "seconds": round(elapsed(), 1), "cpu_seconds": cpu_seconds()})
        return out

    bar = tqdm(total=cfg.num_steps, initial=step, desc="train-vqgan", disable=not cfg.progress)
    window: list[dict[str, jax.Array]] = []
    window_start = time.time()
    stopped_early = False
    # Elapsed seconds when the run's first step (and its compile) was done; a resumed run
    # keeps its original value, so its LR carries on where it was.
    budget_start = meta.get("budget_start")
    try:
        while step < cfg.num_steps:
            progress = step / cfg.num_steps
            if cfg.time_budget_s and budget_start is not None:
                # The LR decays over the time left once the step has compiled (minutes on
                # a busy CPU), so a slow compile does not eat the high-LR phase.
                progress = max(progress, (elapsed() - budget_start)
                               / max(cfg.time_budget_s - budget_start, 1e-9))
            lr = learning_rate_at(cfg, step, progress)
            state, metrics = step_fn(state, next(stream), np.float32(lr))
            metrics["lr"] = lr
            if budget_start is None:
                jax.block_until_ready(metrics["loss"])
                budget_start = elapsed()
            step += 1
            window.append(metrics)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
                means["restarted"] = float(sum(float(m["restarted"]) for m in window))
                rate = len(window) / max(time.time() - window_start, 1e-9)
                _log_metrics(metrics_path, {"step": step, "split": "train", **means,
                                            "steps_per_s": round(rate, 3),
                                            "seconds": round(elapsed(), 1),
                                            "cpu_seconds": cpu_seconds()})
                bar.set_postfix(loss=f"{means['loss']:.4f}", used=f"{means['codes_used']:.2f}")
                window, window_start = [], time.time()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                out = evaluate_now()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
            if stop_at_step is not None and step >= stop_at_step:
                save()
                return None
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save()
            if cfg.time_budget_s and elapsed() >= cfg.time_budget_s:
                stopped_early = step < cfg.num_steps
                break
        save()
    finally:
        bar.close()
        stream.close()
        ckpt.close()
    out = evaluate_now()
    export = state.eval_params()
    if state.ema_params is not None:
        # The average usually wins, but not always (a run stopped early, a decay too slow
        # for the run): the held-out eval picks which of the two is exported.
        raw = evaluate_now(state.params, weights="raw")
        if _score(raw) > _score(out):
            logger.info("exporting the raw parameters: they beat the average on held-out data")
            out, export = raw, state.params
    model_dir = workdir / MODEL_DIR
    nnx.merge(graphdef, export).save_pretrained(model_dir)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in out.items())
    logger.info("step %d%s: %s; exported %s", step,
                " (time budget reached)" if stopped_early else "", summary, model_dir)
    print(f"train-vqgan: step {step} in {elapsed():.0f}s"
          f"{' (time budget reached)' if stopped_early else ''}: {summary}; model in {model_dir}")
    return model_dir


# --------------------------------------------------------------------------------------
# Command line (training/train_vqgan.py and `dalle-mini-jax train-vqgan`)
# --------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The `train-vqgan` flags."""
    parser.add_argument("--workdir", required=True,
                        help="work directory: checkpoints (auto-resume), metrics.jsonl, model/")
    parser.add_argument("--config", default="shapes",
                        help="built-in config (tiny, shapes) or FILE.py[:variant] with get_config()")
    parser.add_argument("--init", default=None,
                        help="fine-tune from this VQGAN model directory (its config.json wins)")
    parser.add_argument("--data", default=None,
                        help="training images: shapes[:N[:SEED]] or a data.open_dataset source")
    parser.add_argument("--eval-data", default=None, help="held-out images (a finite source)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides key=value, e.g. num_steps=500 model.channels=16")


def config_from_args(args) -> VQGANTrainConfig:
    """The config the flags describe: --config, then the named flags, then key=value."""
    from dalle_mini_jax.train_config import apply_overrides

    cfg = load_config(args.config)
    for name in ("init", "data", "eval_data"):
        if getattr(args, name) is not None:
            cfg = cfg.replace(**{name: getattr(args, name)})
    return apply_overrides(cfg, list(args.overrides))


def run(args) -> None:
    """Run `train-vqgan` from parsed `add_arguments` flags (the `cli.register` signature)."""
    train_vqgan(config_from_args(args), args.workdir)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    run(parser.parse_args(argv))


__all__ = [
    "VQGANTrainConfig", "tiny_config", "shapes_config", "load_config", "new_model", "TrainState",
    "make_optimizer", "learning_rate_at", "init_state", "train_step", "jitted_train_step", "BatchStream", "load_eval_images",
    "reconstruct_batch", "reconstruct", "psnr", "reconstruction_metrics", "metrics_of", "train_vqgan",
    "add_arguments", "config_from_args", "run", "main",
]
