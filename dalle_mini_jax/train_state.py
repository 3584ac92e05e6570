"""Train state, optimizer, the pure train/eval steps, and their sharded compilation.

The state is a plain pytree (`TrainState`): parameters as a nested dict of arrays,
the optax state, the update count and the base RNG key. The model's structure (its
NNX graphdef) is static and closed over by the steps, so everything that changes
is one donated argument of one `jax.jit`.

Shapes: G micro-steps, M micro-batch (global), T text length, S image length,
V decoder vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import xla_cpu
from .config import DalleBartConfig
from .sharding import DEFAULT_RULES, activate, batch_sharding, state_shardings
from .train_config import OptimizerConfig, TrainConfig
from .transformer import DalleBart


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: nested dict of the model's parameter arrays (master dtype).
      opt_state: the optax state (moments mirror `params`).
      rng: uint32 [2] raw key data of the run's base key; step `s` uses fold_in(rng, s).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def make_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr, then cosine decay to end_lr_ratio * lr at `total_steps`, or constant."""
    warmup = max(int(opt.warmup_steps), 0)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=opt.lr * opt.end_lr_ratio,
        )
    if warmup == 0:
        return optax.constant_schedule(opt.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr)], [warmup]
    )


def make_optimizer(opt: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if clip_norm > 0) followed by AdamW or Adafactor."""
    lr = make_schedule(opt, total_steps)
    if opt.name == "adamw":
        tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    else:
        # The released trainer's Adafactor: update clipping at 1.0 on top of our global clip.
        tx = optax.adafactor(lr, momentum=opt.b1 or None, weight_decay_rate=opt.weight_decay or None)
    if opt.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
    return tx


# --------------------------------------------------------------------------------------
# Model and state creation, born sharded
# --------------------------------------------------------------------------------------


def model_factory(cfg: TrainConfig, model_cfg: DalleBartConfig) -> Callable[[], DalleBart]:
    """A zero-argument constructor of the training model (compute/param dtypes, remat)."""

    def make():
        model = DalleBart(model_cfg, rngs=nnx.Rngs(cfg.seed), dtype=jnp.dtype(cfg.compute_dtype),
                          param_dtype=jnp.dtype(cfg.param_dtype))
        model.remat = cfg.remat
        return model

    return make


def param_shardings(abstract_model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding per parameter (nested dict), from the logical names and the rule table."""
    _, abstract_state = nnx.split(abstract_model)
    return nnx.to_pure_dict(state_shardings(abstract_state, mesh, rules))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, abstract_params: Any,
                        p_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: a moment shaped like its parameter is laid out like it.

    Everything else (counts, Adafactor's factored row/column statistics, which are
    O(rows + cols)) is replicated.
    """
    replicated = NamedSharding(mesh, P())

    def one(leaf, param, sharding):
        return sharding if getattr(leaf, "shape", None) == param.shape else replicated

    return optax.tree_map_params(
        tx, one, abstract_opt_state, abstract_params, p_shardings,
        transform_non_params=lambda _: replicated,
    )


@dataclasses.dataclass
class StepFns:
    """The compiled steps and the shardings they were compiled for."""

    graphdef: Any  # the model's static structure
    state_shardings: TrainState  # NamedSharding per state leaf
    batch_sharding: NamedSharding  # [G, M, ...] batches, split on M
    train_step: Callable  # (state, batch, rng) -> (state, metrics); state donated
    eval_step: Callable  # (params, batch) -> (sum of losses, number of examples)
    tx: optax.GradientTransformation  # the optimizer the steps use


def build(cfg: TrainConfig, model_cfg: DalleBartConfig, mesh: Mesh,
          uncond: tuple[np.ndarray, np.ndarray], rules=DEFAULT_RULES) -> tuple[StepFns, TrainState, Callable]:
    """Shardings, the jitted steps and an abstract state for a run.

    Args:
      cfg: the run.
      model_cfg: the transformer's shape (cfg.model, or the --init directory's).
      mesh: ('data', 'fsdp', 'tensor') mesh.
      uncond: ([T], [T]) ids and mask of the "" prompt (blank captions).

    Returns:
      (steps, abstract state with shardings, init_fn() -> fresh sharded TrainState).
    """
    factory = model_factory(cfg, model_cfg)
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    abstract_model = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_state)
    p_sh = param_shardings(abstract_model, mesh, rules)
    replicated = NamedSharding(mesh, P())

    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.split(factory())[1])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(cfg.seed)))

    abstract = jax.eval_shape(init)
    shardings = TrainState(
        step=replicated, params=p_sh,
        opt_state=opt_state_shardings(tx, abstract.opt_state, abstract.params, p_sh, mesh),
        rng=replicated,
    )
    b_sh = NamedSharding(mesh, P(None, *batch_sharding(mesh, 1, rules, cfg.micro_batch_size).spec))
    schedule = make_schedule(cfg.optimizer, cfg.steps)
    uncond_ids, uncond_mask = (jnp.asarray(u, jnp.int32) for u in uncond)

    def with_mesh(fn):
        # `constrain` inside the model needs the mesh while tracing.
        @functools.wraps(fn)
        def wrapped(*args):
            with activate(mesh, rules):
                return fn(*args)
        return wrapped

    train = functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=schedule,
        blank_prob=cfg.data.blank_caption_prob, uncond=(uncond_ids, uncond_mask),
    )
    # On a CPU, YNNPACK takes the dots only, not the reductions (xla_cpu.py: 1.35x the bundled model's step).
    options = xla_cpu.compiler_options(mesh.devices.flat[0].platform)
    train_jit = jax.jit(with_mesh(train), in_shardings=(shardings, b_sh, replicated),
                        out_shardings=(shardings, replicated), donate_argnums=0,
                        compiler_options=options)
    evaluate = functools.partial(eval_step, graphdef=graphdef)
    eval_jit = jax.jit(with_mesh(evaluate), in_shardings=(p_sh, b_sh), out_shardings=replicated,
                       compiler_options=options)
    init_jit = jax.jit(init, out_shardings=shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    fns = StepFns(graphdef=graphdef, state_shardings=shardings, batch_sharding=b_sh,
                  train_step=train_jit, eval_step=eval_jit, tx=tx)
    return fns, abstract, init_jit


def state_from_params(fns: StepFns, params: Any, seed: int) -> TrainState:
    """A fresh state (step 0, new optimizer state) around given, already sharded, params."""
    sh = fns.state_shardings

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=fns.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))

    return jax.jit(init, in_shardings=(sh.params,), out_shardings=sh)(params)


# --------------------------------------------------------------------------------------
# The steps (pure)
# --------------------------------------------------------------------------------------


def shift_right(labels: jax.Array, bos: int) -> jax.Array:
    """[..., S] codes -> decoder inputs [BOS, t0 .. t_{S-2}]."""
    start = jnp.full(labels.shape[:-1] + (1,), bos, labels.dtype)
    return jnp.concatenate([start, labels[..., :-1]], axis=-1)


def per_example_loss(graphdef, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy over all image positions, per example, in float32.

    Args:
      params: nested dict of parameters.
      batch: input_ids, attention_mask [M, T]; labels [M, S].

    Returns:
      [M] float32.
    """
    model = nnx.merge(graphdef, params)
    labels = batch["labels"]
    decoder_input_ids = shift_right(labels, model.config.bos_token_id)
    logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return ce.mean(axis=-1)


def blank_captions(batch: dict[str, jax.Array], rng: jax.Array, prob: float,
                   uncond: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Replace each caption by the "" prompt with probability `prob`.

    The draw for example i of the update depends only on (rng, i): the same whatever
    the sharding, the number of processes or of micro-steps.
    """
    if prob <= 0:
        return batch
    G, M = batch["input_ids"].shape[:2]
    # Drawn over the flat global batch: example i of the update gets the same draw for
    # any split into micro-steps.
    blank = jax.random.bernoulli(rng, prob, (G * M,)).reshape(G, M, 1)
    ids, mask = uncond
    return dict(batch, input_ids=jnp.where(blank, ids, batch["input_ids"]),
                attention_mask=jnp.where(blank, mask, batch["attention_mask"]))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, graphdef,
               tx: optax.GradientTransformation, schedule: optax.Schedule, blank_prob: float,
               uncond: tuple[jax.Array, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over G accumulated micro-steps.

    Args:
      state: the train state (donated by the jitted caller).
      batch: input_ids, attention_mask [G, M, T]; labels [G, M, S].
      rng: uint32 [2] key data for this step (fold_in(base, step)).

    Returns:
      (new state, metrics: loss, grad_norm, lr, param_norm as float32 scalars).
    """
    batch = blank_captions(batch, jax.random.wrap_key_data(rng), blank_prob, uncond)
    grad_fn = jax.value_and_grad(lambda p, mb: per_example_loss(graphdef, p, mb).mean())

    def micro_step(carry, micro_batch):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(state.params, micro_batch)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, grad_sum), None

    # One scan for any G (G = 1 included): a single code path for the update.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), batch)
    G = batch["labels"].shape[0]
    loss, grads = loss / G, jax.tree.map(lambda g, p: (g / G).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef) -> jax.Array:
    """Summed validation loss and example count of one [1, M, ...] batch (padding has weight 0).

    Returns:
      float32 [2]: (sum of per-example losses, sum of weights).
    """
    mb = jax.tree.map(lambda x: x[0], batch)
    loss = per_example_loss(graphdef, params, mb)
    w = mb["weight"]
    return jnp.stack([(loss * w).sum(), w.sum()])


def step_rng(base: jax.Array, step: int) -> jax.Array:
    """uint32 [2] key data of step `step`: a function of (seed, step) only."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base), step))
