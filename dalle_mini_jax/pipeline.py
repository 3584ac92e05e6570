"""Text -> images: the one object users hold.

    from dalle_mini_jax import DalleMini
    pipe = DalleMini.from_pretrained("path/to/model")        # or None: the bundled model
    images = pipe.generate(["a red square", "a blue circle"], num_images=4, seed=0)

A model directory holds the transformer (`config.json`, `flax_model.msgpack`) and the
tokenizer files; the VQGAN is the directory named by the transformer config's
`vqgan_path` (relative to the model directory) or, failing that, `model_dir/vqgan`.
It may also hold `generation_config.json`, the sampling settings `generate` uses when
the caller gives none (`read_generation_config`); without it, the released DALL·E Mini
defaults (guidance 10, top-k 50).

Memory. Weights are read tensor by tensor in the requested dtype (a bf16 load never
holds an fp32 copy); only the VQGAN's decoder half (codebook, post_quant_conv, decoder)
is kept; the encoder and decoder layers are handed to the sampler as per-layer buffers
rather than held twice (and, in bf16, so that XLA:CPU makes no float32 copy of a stack:
`DalleBart.encode`, `transformer._dense`); VQGAN decoding runs one image at a time so its activations do not grow
with the batch, and its tallest maps' convolutions by strips of rows
(`VQGANDecoder.ROWS`, `vqgan.conv_rows`), two full maps alive rather than three.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from . import xla_cpu
from .checkpoint import CONFIG_NAME, MSGPACK_NAME, CheckpointError, check_tree, model_dir as _model_dir
from .checkpoint import read_msgpack
from .config import ConfigError, DalleBartConfig, VQGANConfig
from .host_memory import (compile_then_trim, large_buffers_mapped, one_arena, return_free_memory,
                          wait_for_frees)
from .sampling import MODEL_DEFAULT, ModelDefault, SamplingSettings, TokenSampler, image_keys
from .transformer import IMAGE_TABLE, TEXT_TABLE, DalleBart
from .vqgan import Conv, Decoder, VectorQuantizer, released_name

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled" / "model"

# A model directory's sampling defaults, named like Hugging Face's file.
GENERATION_CONFIG_NAME = "generation_config.json"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Grey used for not-yet-generated cells in progressive previews (pixels in [0, 1]).
NEUTRAL_GREY = 0.5


def resolve_dtype(dtype: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or a jnp dtype) -> jnp dtype; ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return jnp.dtype(dtype).type


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """The model directory to load: `model_dir`, or the bundled model when None."""
    if model_dir is None:
        if not (BUNDLED_MODEL_DIR / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"no bundled model: {BUNDLED_MODEL_DIR} does not exist yet in this version of "
                "dalle_mini_jax. Pass a model directory (config.json + flax_model.msgpack + "
                "tokenizer files), e.g. one exported by training or a released DALL·E Mini"
            )
        return BUNDLED_MODEL_DIR
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return path


def resolve_vqgan_dir(model_dir: Path, config: DalleBartConfig, vqgan_dir: str | Path | None) -> Path:
    """`vqgan_dir`, else the config's `vqgan_path` (relative to model_dir), else model_dir/vqgan."""
    if vqgan_dir is not None:
        path = Path(vqgan_dir).expanduser()
        origin = "vqgan_dir"
    elif config.vqgan_path is not None:
        path = model_dir / config.vqgan_path  # an absolute vqgan_path stays absolute
        origin = f"vqgan_path={config.vqgan_path!r} in {model_dir / CONFIG_NAME}"
    else:
        path = model_dir / "vqgan"
        origin = "the default <model_dir>/vqgan"
    if not path.is_dir():
        raise FileNotFoundError(f"VQGAN directory {path} (from {origin}) does not exist; pass vqgan_dir")
    return path


# --------------------------------------------------------------------------------------
# Sampling defaults: generation_config.json
# --------------------------------------------------------------------------------------

# The keys read, with what each must be (null allowed where the setting accepts None).
_GENERATION_KEYS: dict[str, tuple[str, bool]] = {
    "guidance": ("a finite number", True),
    "top_k": ("an integer >= 1", True),
    "top_p": ("a number in (0, 1]", True),
    "temperature": ("a number > 0", False),
}
# Written by Hugging Face's tools into every generation_config.json: nothing to warn about.
_GENERATION_IGNORED = {"transformers_version"}


def read_generation_config(model_dir: str | Path) -> SamplingSettings:
    """The sampling defaults a model directory carries.

    `model_dir/generation_config.json` may set any of `guidance`, `top_k`, `top_p`
    (null = off for each) and `temperature`. Keys it leaves out, and a directory without
    the file (every released DALL·E Mini), get the released defaults
    (`SamplingSettings()`: guidance 10, top_k 50, top_p off, temperature 1).

    Raises:
      ConfigError: the file is not a JSON object, or a value has the wrong type or lies
        out of range; the message names the file and the key.

    Warns (UserWarning) naming keys it does not know; they are ignored.
    """
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return SamplingSettings()
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(d).__name__}")
    unknown = sorted(k for k in d if k not in _GENERATION_KEYS and k not in _GENERATION_IGNORED
                     and not k.startswith("_"))
    if unknown:
        warnings.warn(f"{path}: keys not used by dalle_mini_jax (ignored): {', '.join(unknown)}; "
                      f"the keys read are {', '.join(_GENERATION_KEYS)}", stacklevel=2)
    values = {}
    for key, (what, nullable) in _GENERATION_KEYS.items():
        if key not in d:
            continue
        v = d[key]
        # Type checks here, not in SamplingSettings: JSON gives e.g. a string or 50.5
        # where an int is meant, and the message must point at the file.
        number = isinstance(v, int) if key == "top_k" else isinstance(v, (int, float))
        if not ((v is None and nullable) or (number and not isinstance(v, bool))):
            raise ConfigError(f"{path}: {key} must be {what}{' or null' if nullable else ''}, "
                              f"got {json.dumps(v)}")
        values[key] = v
    try:
        return SamplingSettings(**values)
    except ValueError as e:  # the range checks; the message starts with the key
        raise ConfigError(f"{path}: {e}") from None


def write_generation_config(model_dir: str | Path, **settings: Any) -> Path:
    """Write `model_dir/generation_config.json`, the defaults `DalleMini.from_pretrained` reads.

    Args:
      model_dir: an existing model directory.
      **settings: any of guidance, top_k, top_p, temperature (None = off where allowed).
        The ones not given get the released defaults, not the old file's values: the
        file states all four.

    Returns:
      The path written.

    Raises:
      FileNotFoundError: `model_dir` is not a directory.
      ValueError / TypeError: a value out of range, or an unknown setting.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    chosen = SamplingSettings().override(**settings)
    # Plain JSON numbers, whatever numeric types were passed (numpy scalars included).
    d = {k: None if v is None else (int(v) if k == "top_k" else float(v))
         for k, v in chosen.to_dict().items()}
    target = path / GENERATION_CONFIG_NAME
    target.write_text(json.dumps(d, indent=2) + "\n")
    return target


# --------------------------------------------------------------------------------------
# The VQGAN's decoder half
# --------------------------------------------------------------------------------------


class VQGANDecoder(nnx.Module):
    """Codebook + post_quant_conv + decoder of a VQGAN: codes -> pixels, nothing else.

    Parameter paths are the released ones (`quantize/embedding/embedding`,
    `post_quant_conv/...`, `decoder/...`), so it loads from a full VQGAN directory and
    skips the encoder (a third of the weights), which generation never uses.
    """

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim, **kw)
        self.post_quant_conv = Conv(config.embed_dim, config.z_channels, 1, **kw)
        self.decoder = Decoder(config, **kw)

    # Output rows per strip of the decoder's tallest maps (`vqgan.conv_rows`, `by_rows`):
    # DALL-E Mini's VQGAN decode (256 rows) 96 -> 76 MiB of temporaries, ~6 % slower
    # (`benchmarks/vqgan_decode.py DIR`, README "Measured"); 16 rows would also strip the
    # 128-row maps.
    ROWS = 32

    def decode_latents(self, z: jax.Array, rows: int | None = ROWS) -> jax.Array:
        """[B, h, w, embed_dim] latents -> [B, H, W, 3] float32 pixels clipped to [0, 1].

        `rows`: the decoder's strip height (`vqgan.Decoder`); None for whole maps.
        """
        return jnp.clip(self.decoder(self.post_quant_conv(z), rows).astype(jnp.float32), 0.0, 1.0)

    def latents(self, codes: jax.Array, num_done: jax.Array | None = None) -> jax.Array:
        """[B, S] codes -> [B, h, w, embed_dim] code vectors (row-major grid).

        Positions >= `num_done` get the mean code vector: the least informative latent,
        so a partial grid decodes without the look of any particular code.
        """
        b, s = codes.shape
        side = math.isqrt(s)
        z = self.quantize.lookup(codes)
        if num_done is not None:
            mean = self.quantize.codebook.mean(0).astype(z.dtype)
            z = jnp.where((jnp.arange(s) < num_done)[None, :, None], z, mean)
        return z.reshape(b, side, side, -1)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=jnp.float32) -> "VQGANDecoder":
        """Load the decoder half of a released-format VQGAN directory in `dtype`."""
        path = _model_dir(path, "VQGAN")
        config = VQGANConfig.load(path / CONFIG_NAME)
        flat = read_msgpack(path / MSGPACK_NAME, dtype=np.dtype(dtype))
        for key in [k for k in flat if k.startswith(("encoder/", "quant_conv/"))]:
            del flat[key]  # not needed to decode: free it now
        abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
        graphdef, state = nnx.split(abstract)
        flat_state = nnx.to_flat_state(state)
        check_tree(flat, {released_name(p): v.shape for p, v in flat_state}, str(path / MSGPACK_NAME))
        filled = [(p, v.replace(jnp.asarray(flat.pop(released_name(p)), dtype=dtype))) for p, v in flat_state]
        return nnx.merge(graphdef, nnx.from_flat_state(filled))


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One output of `DalleMini.generate_stream`.

    Attributes:
      step: image tokens generated so far in the current batch (== image_len when final).
      total: image_len.
      images: all N images of the call, grouped by prompt; images of batches not yet
        started are plain grey, the current batch's show its generated cells and grey
        elsewhere.
      final: True on the last frame (every image complete).
    """

    step: int
    total: int
    images: list[Image.Image]
    final: bool


class DalleMini:
    """Text-to-image generation: tokenizer + DalleBart + VQGAN decoder.

    Build with `from_pretrained`. Attributes: `model` (DalleBart), `vqgan`
    (VQGANDecoder), `tokenizer` (TextTokenizer), `config`, `name`, `mesh`, `defaults`
    (the `SamplingSettings` that `generate` uses for the arguments not given: the model
    directory's generation_config.json, else the released defaults).

    A pipeline owns its model: `from_pretrained` hands the stacked layer weights to the
    sampler (`release_stacked`) and leaves the encoder's token table in the checkpoint
    file, memory-mapped (`text_table`; the model holds an empty placeholder, see
    `DalleBart.from_pretrained_text_table_on_host`), and on a CPU without a mesh the
    decoder's token table as well (`image_table`, `sampling.HostTable`), so `pipe.model`
    can only be used through the pipeline. Build one with `DalleBart.from_pretrained`
    for anything else.
    """

    def __init__(self, model: DalleBart, vqgan: VQGANDecoder, tokenizer, name: str = "model",
                 mesh=None, release_stacked: bool = False, defaults: SamplingSettings | None = None,
                 text_table: np.ndarray | None = None, image_table: np.ndarray | None = None):
        cfg = model.config
        vq = vqgan.config
        if cfg.num_image_codes > vq.codebook_size:
            raise ValueError(
                f"the transformer samples {cfg.num_image_codes} image codes but the VQGAN has "
                f"only {vq.codebook_size}: wrong VQGAN for this model?"
            )
        if cfg.image_len != vq.num_tokens:
            raise ValueError(
                f"the transformer makes {cfg.image_len} tokens per image but the VQGAN decodes "
                f"{vq.grid_size}x{vq.grid_size}={vq.num_tokens}: wrong VQGAN for this model?"
            )
        self.model, self.vqgan, self.tokenizer = model, vqgan, tokenizer
        self.config, self.name, self.mesh = cfg, name, mesh
        self.defaults = SamplingSettings() if defaults is None else defaults
        self.sampler = TokenSampler(model, mesh=mesh, release_stacked=release_stacked, text_table=text_table,
                                    image_table=image_table)
        self._vq_graphdef, self._vq_state = nnx.split(vqgan)
        self._vq_decode = vqgan_decode_fn(jax.tree.leaves(self._vq_state)[0].dtype)
        self._vq_compiled = False  # see _compile_vqgan

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, vqgan_dir: str | Path | None = None,
                        dtype: Any = "float32", mesh=None, compile_ahead: bool = True) -> "DalleMini":
        """Load a model directory (None = the bundled model), its VQGAN and sampling defaults.

        The defaults (`self.defaults`) come from the directory's generation_config.json
        (`read_generation_config`); without one, the released DALL·E Mini defaults.
        On glibc it first limits malloc to one arena for the whole process
        (`host_memory.one_arena`; set MALLOC_ARENA_MAX to choose otherwise).

        Args:
          model_dir: transformer + tokenizer directory, or None for the bundled model.
          vqgan_dir: VQGAN directory; None = the config's `vqgan_path` or model_dir/vqgan.
          dtype: 'float32', 'bfloat16' or 'float16': weights are loaded directly in it
            (cast tensor by tensor) and computation runs in it.
          mesh: a `sharding.make_mesh(...)` mesh to shard the transformer over, or None.
          compile_ahead: without a mesh, compile the generation of one image with the
            default settings now (`compile_for()`): the first `generate(prompt)` then
            compiles nothing, and the compiler's working memory comes and goes before
            any generation's (lower peak RSS). False leaves it to the first generation
            or to `compile_for` with the settings you will use.

        Raises:
          FileNotFoundError: a directory or the bundled model is missing.
          CheckpointError / ConfigError: damaged or unsupported files.
          ValueError: unknown dtype, or a VQGAN that does not fit the transformer.
        """
        one_arena()  # before JAX's threads start (the backend query below): see one_arena
        dtype = resolve_dtype(dtype)
        path = resolve_model_dir(model_dir)
        config = DalleBartConfig.load(path / CONFIG_NAME)
        defaults = read_generation_config(path)  # before the weights: a bad file fails fast
        vq_path = resolve_vqgan_dir(path, config, vqgan_dir)
        # Local import: text.py pulls in ftfy/emoji, not needed by the rest of the package.
        from .text import TextTokenizer

        tokenizer = TextTokenizer.from_pretrained(path, text_len=config.text_len,
                                                  normalize=config.normalize_text)
        with large_buffers_mapped():
            vqgan = VQGANDecoder.from_pretrained(vq_path, dtype=dtype)
        # Before the transformer loads: the compiler's working memory (~180 MiB for
        # DALL-E Mini's VQGAN in bf16) then comes and goes with only the VQGAN resident;
        # compiled last, it was the peak of loading (`benchmarks/load_memory.py DIR
        # --timeline`).
        compile_vqgan_decode(vqgan)
        with large_buffers_mapped():
            # On a CPU without a mesh the decoder's token table stays in the file too
            # (`sampling.HostTable`: a host callback per step, which elsewhere would stall).
            tables = (TEXT_TABLE, IMAGE_TABLE) if mesh is None and jax.default_backend() == "cpu" else (TEXT_TABLE,)
            model, on_host = DalleBart.from_pretrained_tables_on_host(path, dtype=dtype, mesh=mesh, tables=tables)
            # Give the host tensors freed by loading back to the OS before the sampler
            # splits the stacked decoder into per-layer buffers (benchmarks/load_memory.py:
            # mini fp32 2.06 GB resident after the trim, 2.12 GB after the split).
            return_free_memory()
            name = "bundled" if model_dir is None else path.name
            pipe = cls(model, vqgan, tokenizer, name=name, mesh=mesh, release_stacked=True,
                       defaults=defaults, text_table=on_host[TEXT_TABLE], image_table=on_host.get(IMAGE_TABLE))
        return_free_memory()
        pipe._vq_compiled = True  # compile_vqgan_decode above
        if compile_ahead:
            pipe.compile_for()
        return pipe

    # ---- generation -----------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        num_images: int = 1,
        seed: int = 0,
        temperature: float | ModelDefault = MODEL_DEFAULT,
        top_k: int | None | ModelDefault = MODEL_DEFAULT,
        top_p: float | None | ModelDefault = MODEL_DEFAULT,
        guidance: float | None | ModelDefault = MODEL_DEFAULT,
        progress: bool | Callable[[int, int], None] = False,
        batch_size: int | None = 16,
    ) -> list[Image.Image]:
        """Generate `num_images` images for each prompt.

        Args:
          prompts: one prompt or a list; over-long prompts are truncated (with a warning).
          num_images: images per prompt (>= 1).
          seed: image k of prompt p is `image_keys(seed, [p], [k])`: the same image
            whatever else is in the call, the batch size or the device count.
          temperature: > 0, divides the guided logits.
          top_k: keep the k most likely codes (None: all).
          top_p: nucleus sampling in (0, 1], None = off.
          guidance: super-conditioning scale (None or 1 = off).
            Each of these four left at `MODEL_DEFAULT` takes `self.defaults`' value: the
            model directory's generation_config.json, else the released DALL·E Mini's
            (guidance 10, top_k 50, top_p off, temperature 1). None means off, not default.
          progress: True for a tqdm bar over decode steps, or a callable
            `progress(steps_done, steps_total)`.
          batch_size: images decoded together (2x rows when guided); None = all at once.

        Returns:
          N = len(prompts) * num_images PIL images, grouped by prompt in the order given
          (image k of prompt p at p * num_images + k). Each carries `image.info` with
          prompt, seed, index, settings and model (the CLI writes them to PNG chunks).
        """
        frames = self._frames(prompts, num_images, seed, temperature, top_k, top_p, guidance,
                              progress, batch_size, every=None)
        last = None
        for last in frames:
            pass
        return last.images

    def generate_stream(
        self,
        prompts: str | Sequence[str],
        num_images: int = 1,
        seed: int = 0,
        temperature: float | ModelDefault = MODEL_DEFAULT,
        top_k: int | None | ModelDefault = MODEL_DEFAULT,
        top_p: float | None | ModelDefault = MODEL_DEFAULT,
        guidance: float | None | ModelDefault = MODEL_DEFAULT,
        every: int = 32,
        batch_size: int | None = 16,
    ) -> Iterator[Frame]:
        """Like `generate`, yielding a `Frame` of partial images every `every` tokens.

        Cells not generated yet are decoded from the mean code vector and then painted
        a neutral grey, so a preview shows only what the model has chosen. The decode
        loop runs in jitted chunks of `every` steps with the same compiled code as
        `generate`, so the final images equal `generate`'s. Sampling settings left at
        `MODEL_DEFAULT` take `self.defaults`' values, as in `generate`.
        """
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int, got {every!r}")
        return self._frames(prompts, num_images, seed, temperature, top_k, top_p, guidance,
                            False, batch_size, every=every)

    def generate_codes(
        self,
        prompts: str | Sequence[str],
        num_images: int = 1,
        seed: int = 0,
        temperature: float | ModelDefault = MODEL_DEFAULT,
        top_k: int | None | ModelDefault = MODEL_DEFAULT,
        top_p: float | None | ModelDefault = MODEL_DEFAULT,
        guidance: float | None | ModelDefault = MODEL_DEFAULT,
        batch_size: int | None = 16,
    ) -> np.ndarray:
        """The image codes `generate` would decode: [N, image_len] int32.

        Sampling settings left at `MODEL_DEFAULT` take `self.defaults`' values, as in
        `generate`.
        """
        texts, settings, batches = self._plan(prompts, num_images, seed, temperature, top_k, top_p,
                                              guidance, batch_size)
        out = []
        for batch in batches:
            state, keys = self._start(batch, settings)
            state = self.sampler.run(state, keys, 0, self.config.image_len, settings)
            out.append(np.asarray(jax.device_get(state.tokens)))
        return np.concatenate(out)

    def decode_codes(self, codes: np.ndarray, num_done: int | None = None) -> np.ndarray:
        """[N, S] codes -> [N, H, W, 3] float32 pixels in [0, 1], one image at a time.

        With `num_done`, positions >= num_done are treated as not generated: decoded
        from the mean code and painted `NEUTRAL_GREY`.
        """
        codes = np.asarray(codes, np.int32)
        S = codes.shape[1]
        done = S if num_done is None else int(num_done)
        self._compile_vqgan()
        # Decoding a 256x256 image is generation's peak of memory: give what the decode
        # loop freed back first (once XLA:CPU has freed it: `wait_for_frees`), so the
        # decode's temporaries do not stack on it.
        wait_for_frees()
        return_free_memory()
        # device_put, not jnp.asarray, which compiles a (tiny) program per shape on its first use.
        imgs = [np.asarray(self._vq_decode(self._vq_graphdef, self._vq_state, jax.device_put(c[None]),
                                           jnp.int32(done)))[0]
                for c in codes]
        images = np.stack(imgs) if imgs else np.zeros((0,), np.float32)
        if done < S and len(imgs):
            grid = math.isqrt(S)
            f = images.shape[1] // grid
            pending = (np.arange(S) >= done).reshape(grid, grid)
            pending = np.kron(pending, np.ones((f, f), bool))
            images[:, pending] = NEUTRAL_GREY
        return images

    # ---- internals ------------------------------------------------------------------
    def _compile_vqgan(self) -> None:
        """Compile the VQGAN decode of one image (once; `from_pretrained` does it while
        loading, before the transformer).

        Compiling it is a peak of memory (the compiler's working memory, given back after,
        `compile_then_trim`): done ahead, it happens with the least else alive, not on top
        of the transformer's compiled programs and KV cache.
        """
        if not self._vq_compiled:
            compile_vqgan_decode(self.vqgan)
            self._vq_compiled = True

    def compile_for(self, num_prompts: int = 1, num_images: int = 1,
                    temperature: float | ModelDefault = MODEL_DEFAULT,
                    top_k: int | None | ModelDefault = MODEL_DEFAULT,
                    top_p: float | None | ModelDefault = MODEL_DEFAULT,
                    guidance: float | None | ModelDefault = MODEL_DEFAULT,
                    batch_size: int | None = 16, prompts: Sequence[str] | None = None) -> None:
        """Compile what `generate` of `num_prompts` prompts with these arguments (as there)
        will run, without running it (`TokenSampler.compile_ahead`); the VQGAN decode is
        compiled already. Does nothing with a mesh.

        `prompts`, when known, stand for themselves (else `num_prompts` one-word ones):
        with a folded cross-attention (`TokenSampler.fold_plan`) the prompts' token
        counts are a shape of the compiled program too (DALL-E Mini on a CPU: one program
        up to 14 real tokens with the unconditional prompt's 2, one up to 30, one beyond).

        Why: compiling the decode loop takes ~140 MiB of working memory for DALL-E Mini;
        done here, before a generation, it does not stack on the decode state and the
        encoder's compiled program (`from_pretrained(compile_ahead=True)` calls this with
        the defaults; the CLI with its arguments).
        """
        if self.mesh is not None:
            return
        texts = ["a"] * num_prompts if prompts is None else prompts  # `_plan` takes one str too
        _, settings, batches = self._plan(texts, num_images, 0, temperature, top_k, top_p, guidance, batch_size)
        for batch in batches:
            self.sampler.compile_ahead(*self._start_inputs(batch, settings), settings)

    def _plan(self, prompts, num_images, seed, temperature, top_k, top_p, guidance, batch_size):
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("no prompts given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"prompt {i} is a {type(t).__name__}, not a str")
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        settings = self.defaults.override(temperature=temperature, top_k=top_k, top_p=top_p,
                                          guidance=guidance)
        images = [(p, k) for p in range(len(texts)) for k in range(num_images)]
        step = len(images) if batch_size is None else batch_size
        batches = [dict(images=images[i:i + step], texts=texts, seed=int(seed))
                   for i in range(0, len(images), step)]
        return texts, settings, batches

    def _start(self, batch, settings: SamplingSettings):
        ids, mask, rows, uncond_row, keys = self._start_inputs(batch, settings)
        return self.sampler.start(ids, mask, rows, uncond_row), keys

    def _start_inputs(self, batch, settings: SamplingSettings):
        """(ids, mask, rows, uncond_row, keys) of one planned batch: the sampler's inputs."""
        texts = batch["texts"]
        prompt_ids = sorted({p for p, _ in batch["images"]})
        tok = self.tokenizer([texts[p] for p in prompt_ids])
        ids, mask = tok["input_ids"], tok["attention_mask"]
        uncond_row = None
        if settings.guided:
            u = self.tokenizer.unconditional(1)
            ids = np.concatenate([ids, u["input_ids"]])
            mask = np.concatenate([mask, u["attention_mask"]])
            uncond_row = len(prompt_ids)
        where = {p: i for i, p in enumerate(prompt_ids)}
        rows = np.asarray([where[p] for p, _ in batch["images"]], np.int32)
        keys = image_keys(batch["seed"], [texts[p] for p, _ in batch["images"]],
                          [k for _, k in batch["images"]])
        return ids, mask, rows, uncond_row, keys

    def _frames(self, prompts, num_images, seed, temperature, top_k, top_p, guidance, progress,
                batch_size, every) -> Iterator[Frame]:
        texts, settings, batches = self._plan(prompts, num_images, seed, temperature, top_k, top_p,
                                              guidance, batch_size)
        return self._frames_iter(texts, settings, batches, progress, every)

    def _frames_iter(self, texts, settings, batches, progress, every) -> Iterator[Frame]:
        S = self.config.image_len
        total_steps = S * len(batches)
        bar, report = None, None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, unit="tok", desc="generating")
        elif callable(progress):
            report = progress
        # Chunks: previews every `every` tokens; a progress bar updated every ~1/32 of an
        # image; otherwise one call for the whole loop. Same compiled code in all cases.
        chunk = every if every is not None else (max(1, S // 32) if (bar or report) else S)
        side = self.vqgan.config.resolution
        done_images: list[Image.Image] = []
        n_images = sum(len(b["images"]) for b in batches)
        try:
            for bi, batch in enumerate(batches):
                state, keys = self._start(batch, settings)
                pos = 0
                while pos < S:
                    end = min(S, pos + chunk)
                    state = self.sampler.run(state, keys, pos, end, settings)
                    if bar is not None:
                        state.tokens.block_until_ready()  # so the bar moves with the work
                        bar.update(end - pos)
                    pos = end
                    if report is not None:
                        report(bi * S + pos, total_steps)
                    if every is not None and pos < S:
                        codes = np.asarray(jax.device_get(state.tokens))
                        partial = self._to_pil(self.decode_codes(codes, num_done=pos), batch, settings, final=False)
                        rest = n_images - len(done_images) - len(partial)
                        grey = [_grey(side) for _ in range(rest)]
                        yield Frame(step=pos, total=S, images=done_images + partial + grey, final=False)
                codes = np.asarray(jax.device_get(state.tokens))
                state = None  # the KV cache: not needed to decode (see decode_codes)
                done_images = done_images + self._to_pil(self.decode_codes(codes), batch, settings, final=True)
                if every is not None and bi < len(batches) - 1:
                    grey = [_grey(side) for _ in range(n_images - len(done_images))]
                    yield Frame(step=S, total=S, images=done_images + grey, final=False)
        finally:
            if bar is not None:
                bar.close()
        yield Frame(step=S, total=S, images=done_images, final=True)

    def _to_pil(self, pixels: np.ndarray, batch, settings: SamplingSettings, final: bool) -> list[Image.Image]:
        out = []
        for (p, k), px in zip(batch["images"], pixels):
            # x255 then truncate, as the original notebook (uint8(x * 255)).
            img = Image.fromarray((px * 255).astype(np.uint8))
            if final:
                img.info.update(self.image_metadata(batch["texts"][p], batch["seed"], k, settings))
            out.append(img)
        return out

    def image_metadata(self, prompt: str, seed: int, index: int, settings: SamplingSettings) -> dict[str, str]:
        """The text chunks an image is saved with (all values str); `settings` are the ones used."""
        return {
            "prompt": prompt,
            "seed": str(seed),
            "index": str(index),
            "settings": json.dumps(settings.to_dict()),
            "model": self.name,
            "software": "dalle_mini_jax",
        }


def _decode_impl(graphdef, state, codes, num_done, *, rows):
    """[1, S] codes -> [1, H, W, 3] pixels; cells >= num_done from the mean code."""
    v = nnx.merge(graphdef, state)
    return v.decode_latents(v.latents(codes, num_done), rows)


@functools.cache
def _decode_jit(rows: int | None, **options: str):
    """`_decode_impl` jitted for strips of `rows` (None: whole maps) with these XLA
    compiler options (one jit per choice)."""
    return jax.jit(functools.partial(_decode_impl, rows=rows), static_argnums=0,
                   compiler_options=options or None)


def vqgan_decode_fn(dtype: Any = jnp.float32):
    """The jitted VQGAN decode (`_decode_impl`: graphdef static, then state, codes [1, S],
    num_done) for weights of `dtype`: strips of `VQGANDecoder.ROWS` rows, with the
    XLA:CPU options measured for it.

    Every dtype gets `xla_cpu.compiler_options()` (on a CPU: YNNPACK for the dots only,
    the group norms' reductions left to XLA): one 256x256 image from DALL-E Mini's VQGAN
    ~1.1x faster in float32, same temporaries (`python benchmarks/vqgan_decode.py DIR`,
    README "Measured"); in bf16 and f16, since the strips hold their maps as 16-bit bits
    (`vqgan.slice_rows`), 1.20x and 1.15x faster than XLA's defaults by strips, with
    fewer temporaries (bf16 51.7 -> 48.2 MiB; `vqgan_decode.py DIR --dtype bfloat16`).
    With whole maps the option had added temporaries in bf16 (96 -> 112 MiB), which is
    why 16-bit weights once kept XLA's defaults.
    """
    options = xla_cpu.compiler_options()
    return _decode_jit(VQGANDecoder.ROWS, **options)


def compile_vqgan_decode(vqgan: VQGANDecoder) -> None:
    """Compile `vqgan_decode_fn` for one image of `vqgan` ahead of its first call (jit's
    cache then serves the pipeline's decodes) and give the compiler's memory back
    (`compile_then_trim`)."""
    graphdef, state = nnx.split(vqgan)
    S = vqgan.config.num_tokens
    decode = vqgan_decode_fn(jax.tree.leaves(state)[0].dtype)
    compile_then_trim(lambda: decode.lower(graphdef, state, jnp.zeros((1, S), jnp.int32), jnp.int32(S)))


def _grey(side: int) -> Image.Image:
    return Image.new("RGB", (side, side), tuple([int(NEUTRAL_GREY * 255)] * 3))


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all the same size) into one grid image, row by row."""
    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


__all__ = ["DalleMini", "Frame", "VQGANDecoder", "image_grid", "resolve_dtype", "BUNDLED_MODEL_DIR",
           "DTYPES", "NEUTRAL_GREY", "CheckpointError", "GENERATION_CONFIG_NAME", "MODEL_DEFAULT",
           "read_generation_config", "write_generation_config"]
