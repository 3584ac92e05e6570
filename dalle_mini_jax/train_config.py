"""Training configs: frozen dataclasses, the built-in experiments, overrides, JSON.

A run is described by one `TrainConfig`. It comes from a built-in name (`tiny`,
`shapes`; these work from an installed package) or from a Python file under
`training/configs/` that defines `get_config(variant: str | None) -> TrainConfig`
(`--config training/configs/shapes.py:tiny` passes "tiny"). Command-line overrides
(`optimizer.lr=1e-3`, `steps=100`, `model=shapes`, `model.embed_dim=128`) are applied
on top with `apply_overrides`; the final config is written to the work directory as
`train_config.json`, so a run can be resumed or exported from that directory alone.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

from .config import DalleBartConfig, transformer_preset


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule and clipping."""

    name: str = "adamw"  # "adamw" (optax.adamw) or "adafactor" (optax.adafactor)
    lr: float = 1e-3  # peak learning rate, reached at the end of the warmup
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many updates
    schedule: str = "cosine"  # after warmup: "cosine" (to end_lr_ratio * lr at `steps`) or "constant"
    end_lr_ratio: float = 0.1  # final lr / peak lr of the cosine decay
    b1: float = 0.9  # AdamW first-moment decay (Adafactor: momentum if > 0, else none)
    b2: float = 0.999  # AdamW second-moment decay (Adafactor: its own decay_rate is used)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) / weight_decay_rate (Adafactor)
    clip_norm: float = 1.0  # global gradient-norm clipping threshold; 0 disables it


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the encoded examples, the tokenizer and the VQGAN come from."""

    train: str | None = None  # glob of encoded parquet shards (columns caption, encoding)
    valid: str | None = None  # glob of validation shards; None: no validation loss
    tokenizer: str | None = None  # tokenizer directory; None: the --init model directory's
    vqgan: str | None = None  # VQGAN model directory (samples, export); None: the init model's
    # Built-in data preparation run before training when `train` is None: "shapes" makes a
    # shapes set, trains a small VQGAN and a BPE tokenizer, and encodes the set, all in
    # WORKDIR/data (see train.prepare_data).
    prepare: str | None = None
    prepare_images: int = 2000  # images in the prepared shapes set (a tenth more for validation)
    prepare_vqgan_steps: int = 300  # VQGAN training steps of the preparation
    prepare_vocab_size: int = 512  # BPE vocabulary of the prepared tokenizer
    blank_caption_prob: float = 0.0  # chance a caption is replaced by "" (guidance training)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); one size may be -1 for the devices left."""

    data: int = -1  # pure data parallelism
    fsdp: int = 1  # data parallelism with weights and optimizer state split on `embed`
    tensor: int = 1  # Megatron-style split of heads / mlp / vocab


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process setup for `jax.distributed.initialize` (also read from the environment:
    DALLE_COORDINATOR_ADDRESS, DALLE_NUM_PROCESSES, DALLE_PROCESS_ID)."""

    coordinator_address: str | None = None  # "host:port" of process 0; None: env or one process
    num_processes: int | None = None  # processes in the job
    process_id: int | None = None  # this process's index, 0 .. num_processes-1


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The sample grid saved as PNG during training (needs a VQGAN and the sampler)."""

    every: int = 0  # save WORKDIR/samples/step_XXXXXXX.png every N steps; 0 disables
    prompts: tuple[str, ...] = ("a red circle", "a blue square on the left")  # one grid row each
    per_prompt: int = 4  # images per prompt (grid columns)
    condition_scale: float = 3.0  # classifier-free guidance scale
    top_k: int | None = None  # sample from the k most likely codes; None: all
    temperature: float = 1.0  # softmax temperature
    seed: int = 0  # sampling seed (the same images at every step, to compare)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    model: DalleBartConfig = transformer_preset("tiny")  # shape; replaced by --init's config.json
    init: str | None = None  # model directory to start from (released or ours); None: scratch
    seed: int = 0  # parameters, data order, blank captions and step RNG all derive from it
    steps: int = 1000  # optimizer updates in the run (the schedule's length too)
    batch_size: int = 32  # global examples per update (all processes, all micro-steps)
    grad_accum: int = 1  # micro-steps per update; batch_size must divide by it
    compute_dtype: str = "float32"  # activations / matmuls: "float32" or "bfloat16"
    param_dtype: str = "float32"  # master weights and optimizer state ("float32" with bf16 compute)
    remat: bool = False  # rematerialise each layer in the backward pass (less memory, ~1/3 more FLOPs)
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    sample: SampleConfig = SampleConfig()
    log_every: int = 10  # write train metrics every N steps (averaged over them)
    eval_every: int = 0  # validation loss every N steps (and at the end); 0: only at the end
    eval_batches: int = 0  # validation batches per evaluation; 0: the whole validation set
    checkpoint_every: int = 500  # Orbax checkpoint every N steps (and at the end); 0: end only
    keep_checkpoints: int = 3  # checkpoints kept in WORKDIR/checkpoints
    async_checkpoints: bool = True  # write checkpoints in the background while training goes on
    progress: bool = True  # tqdm progress bar on process 0

    def __post_init__(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} does not divide by grad_accum={self.grad_accum}")
        if self.optimizer.name not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer.name={self.optimizer.name!r}: choose 'adamw' or 'adafactor'")
        if self.optimizer.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer.schedule={self.optimizer.schedule!r}: choose 'cosine' or 'constant'")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name}={getattr(self, name)!r}: choose 'float32' or 'bfloat16'")
        if not 0.0 <= self.data.blank_caption_prob <= 1.0:
            raise ValueError(f"data.blank_caption_prob={self.data.blank_caption_prob} is not a probability")

    @property
    def micro_batch_size(self) -> int:
        """Global examples per micro-step."""
        return self.batch_size // self.grad_accum

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------
# Built-in experiments (usable from an installed package; training/configs/ extends them)
# --------------------------------------------------------------------------------------


def tiny_config() -> TrainConfig:
    """Seconds on a laptop CPU: a small shapes set, a small VQGAN, the tiny transformer."""
    return TrainConfig(
        # Tiny transformer over the 8x8 = 64 codes of the shapes VQGAN (256 codes).
        model=transformer_preset("tiny").replace(image_vocab_size=256, image_len=64, text_len=32),
        steps=200,
        batch_size=16,
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=20),
        data=DataConfig(prepare="shapes", prepare_images=512, prepare_vqgan_steps=100,
                        prepare_vocab_size=512, blank_caption_prob=0.1),
        log_every=10,
        eval_every=100,
        checkpoint_every=100,
        sample=SampleConfig(every=0),
    )


def shapes_config() -> TrainConfig:
    """The bundled shapes model: 64x64 shapes images, the `shapes` transformer preset."""
    return TrainConfig(
        model=transformer_preset("shapes"),
        steps=20000,
        batch_size=64,
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=500, weight_decay=0.01),
        data=DataConfig(prepare="shapes", prepare_images=50000, prepare_vqgan_steps=2000,
                        prepare_vocab_size=1024, blank_caption_prob=0.1),
        log_every=50,
        eval_every=1000,
        checkpoint_every=1000,
        sample=SampleConfig(every=2000),
    )


BUILTIN_CONFIGS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny_config,
    "shapes": shapes_config,
}


def load_config(spec: str) -> TrainConfig:
    """A config from a built-in name (`tiny`) or a file (`path/to/cfg.py[:variant]`).

    The file must define `get_config(variant: str | None = None) -> TrainConfig`.
    """
    if spec in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[spec]()
    path, _, variant = spec.partition(":")
    if not path.endswith(".py") or not Path(path).is_file():
        raise ValueError(
            f"--config {spec!r} is neither a built-in config ({', '.join(sorted(BUILTIN_CONFIGS))}) "
            "nor an existing .py file (optionally followed by :variant)"
        )
    module_spec = importlib.util.spec_from_file_location(f"_train_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(variant=None)")
    cfg = module.get_config(variant or None)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"{path}: get_config returned {type(cfg).__name__}, not a TrainConfig")
    return cfg


# --------------------------------------------------------------------------------------
# Overrides: "a.b.c=value"
# --------------------------------------------------------------------------------------


def _parse_value(text: str, current: Any) -> Any:
    """Parse an override value; the current value's type decides how."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        value = ast.literal_eval(text)
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if isinstance(current, str):
        return text
    # current is None (an optional field): a literal if it parses, else the string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _override(obj: Any, path: list[str], text: str, full: str) -> Any:
    name = path[0]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        fields = sorted(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else []
        raise ValueError(f"override {full!r}: no field {name!r} (fields: {', '.join(fields)})")
    current = getattr(obj, name)
    if len(path) > 1:
        value = _override(current, path[1:], text, full)
    elif isinstance(current, DalleBartConfig):
        value = transformer_preset(text)  # `model=shapes`: a preset by name
    elif dataclasses.is_dataclass(current):
        raise ValueError(f"override {full!r}: {name} is a group; set its fields ({name}.x=...)")
    else:
        try:
            value = _parse_value(text, current)
        except ValueError as e:
            raise ValueError(f"override {full!r}: {e}") from None
    return dataclasses.replace(obj, **{name: value})


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key.sub=value` overrides in order; unknown keys are errors, never ignored."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} is not key=value")
        cfg = _override(cfg, key.strip().split("."), text.strip(), item)
    return cfg


# --------------------------------------------------------------------------------------
# JSON round trip (WORKDIR/train_config.json)
# --------------------------------------------------------------------------------------


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            default = getattr(cls(), f.name) if cls is not TrainConfig else getattr(TrainConfig(), f.name)
            if isinstance(default, DalleBartConfig):
                v = DalleBartConfig(**v)
            elif dataclasses.is_dataclass(default):
                v = build(type(default), v)
            elif isinstance(default, tuple) and isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(TrainConfig, d)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def read_config(path: str | Path) -> TrainConfig:
    return from_dict(json.loads(Path(path).read_text()))
