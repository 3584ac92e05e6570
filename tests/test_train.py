"""Trainer: configs, data order, the sharded step (8 fake CPU devices), layouts.

One train step on meshes data=8, fsdp=8 and data=2 x fsdp=2 x tensor=2 (the latter
also with 2 accumulated micro-steps) must give the loss, gradients and updated
parameters of one device. Everything runs in float32 with
jax_default_matmul_precision=highest (conftest); what is left is the order of float32
sums across devices. Tolerances: loss rtol 1e-6; gradient norm rtol 1e-5; AdamW
moments (i.e. the gradients) rtol 1e-4 + 1e-5 x the leaf's max; parameters after one
update at lr 1e-2: rtol 1e-5 + atol 1e-4 (1% of lr, see the test).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import train_testdata as td
from dalle_mini_jax import train_config as tc
from dalle_mini_jax import xla_cpu
from dalle_mini_jax.config import transformer_preset
from dalle_mini_jax.sharding import make_mesh
from dalle_mini_jax.text import TextTokenizer
from dalle_mini_jax.train_data import BatchIterator, DataPosition, load_encoded, unconditional_tokens
from dalle_mini_jax.train_state import build, make_schedule, step_rng

REPO = Path(__file__).resolve().parents[1]
LR = 1e-2  # the sharded-step test's learning rate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return td.make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def tokenizer(data):
    return TextTokenizer.from_pretrained(data.tokenizer, text_len=16)


@pytest.fixture(scope="module")
def encoded(data, tokenizer):
    return load_encoded(data.train, tokenizer, image_len=16, num_codes=32)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def test_overrides_parse_by_field_type():
    cfg = tc.apply_overrides(tc.tiny_config(), [
        "optimizer.lr=3e-4", "steps=7", "remat=true", "model=shapes", "model.num_heads=8",
        "data.blank_caption_prob=0.25", "data.train=/x/*.parquet", "sample.prompts=['a', 'b']",
        "mesh.fsdp=2", "optimizer.name=adafactor",
    ])
    assert cfg.optimizer.lr == 3e-4 and cfg.steps == 7 and cfg.remat is True
    assert cfg.model == transformer_preset("shapes").replace(num_heads=8)
    assert cfg.data.blank_caption_prob == 0.25 and cfg.data.train == "/x/*.parquet"
    assert cfg.sample.prompts == ("a", "b") and cfg.mesh.fsdp == 2
    with pytest.raises(ValueError, match="no field 'lrr'"):
        tc.apply_overrides(cfg, ["optimizer.lrr=1"])
    with pytest.raises(ValueError, match="not key=value"):
        tc.apply_overrides(cfg, ["steps"])
    with pytest.raises(ValueError, match="adamw"):
        tc.apply_overrides(cfg, ["optimizer.name=sgd"])


def test_config_json_round_trip(tmp_path):
    cfg = tc.apply_overrides(tc.shapes_config(), ["sample.top_k=5", "init=/some/dir"])
    tc.save_config(cfg, tmp_path / "c.json")
    assert tc.read_config(tmp_path / "c.json") == cfg


def test_experiment_configs_load_with_tiny_variants():
    for name in ("tiny.py", "shapes.py", "finetune.py"):  # the transformer's experiments
        f = REPO / "training" / "configs" / name
        first = f.read_text().splitlines()[0]
        assert first.startswith("#") and "train" in first, f"{f.name} must start with its command"
        full, tiny = tc.load_config(str(f)), tc.load_config(f"{f}:tiny")
        assert isinstance(full, tc.TrainConfig) and tiny.steps <= full.steps


def test_schedules():
    opt = tc.OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
    s = make_schedule(opt, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55) and float(s(110)) == pytest.approx(0.1)
    c = make_schedule(tc.OptimizerConfig(lr=2.0, warmup_steps=4, schedule="constant"), 100)
    assert float(c(2)) == pytest.approx(1.0) and float(c(4)) == 2.0 and float(c(99)) == 2.0


# --------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_and_position(encoded):
    mesh = make_mesh(devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, P(None, "data"))
    it = BatchIterator(encoded, 16, 2, seed=3, sharding=sharding)
    n = len(encoded)
    seen = []
    positions = []
    for _ in range(n // 16):  # one epoch
        positions.append(it.position)
        seen.append(np.asarray(it.global_indices(it.position)).ravel())
        next(it)
    assert it.position == DataPosition(1, 0)
    epoch0 = np.concatenate(seen)
    assert len(set(epoch0.tolist())) == len(epoch0) == (n // 16) * 16  # each example once
    assert not np.array_equal(it.global_indices(DataPosition(1, 0)).ravel(), seen[0])  # reshuffled
    # Resuming at a stored position gives the same batch, values included.
    again = BatchIterator(encoded, 16, 2, seed=3, sharding=sharding, position=positions[2])
    batch = next(again)
    assert batch["labels"].shape == (2, 8, 16)
    np.testing.assert_array_equal(np.asarray(batch["labels"]).reshape(16, 16),
                                  encoded.labels[seen[2]])


# --------------------------------------------------------------------------------------
# The sharded step
# --------------------------------------------------------------------------------------


def _setup(cfg, mesh, tokenizer):
    return build(cfg, cfg.model, mesh, unconditional_tokens(tokenizer))


@pytest.fixture(scope="module")
def step_results(tokenizer, encoded):
    """One step from the same initial state and batch on several meshes.

    The initial state is born sharded on data=2 x fsdp=2 x tensor=2 and copied to the
    other meshes; that mesh's step also accumulates 2 micro-steps (one compile less).
    """
    cfg = td.tiny_run(tc.DataConfig(blank_caption_prob=0.5), batch_size=16,
                      optimizer=tc.OptimizerConfig(lr=LR, warmup_steps=0, schedule="constant"))
    rng = step_rng(np.asarray(jax.random.key_data(jax.random.key(0))), 0)
    results = {}
    initial = None
    for name, shape, accum in [("2x2x2", (2, 2, 2), 2), ("one", (1, 1, 1), 1),
                               ("data8", (8, 1, 1), 1), ("fsdp8", (1, 8, 1), 1)]:
        mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        run = cfg.replace(grad_accum=accum)
        fns, abstract, init = _setup(run, mesh, tokenizer)
        if initial is None:
            results["born"] = init()  # born sharded (kept: the step donates its input)
            initial = jax.device_get(results["born"])
        state = jax.device_put(initial, fns.state_shardings)
        batch = next(BatchIterator(encoded, run.batch_size, run.grad_accum, run.seed, fns.batch_sharding))
        new, metrics = fns.train_step(state, batch, rng)
        results[name] = (jax.device_get(new), jax.device_get(metrics), new, fns, batch)
    results["initial"] = initial
    return results


@pytest.mark.parametrize("name", ["data8", "fsdp8", "2x2x2"])
def test_sharded_step_matches_one_device(step_results, name):
    """Same loss, gradient norm, parameters and AdamW moments as one device (2x2x2: + accumulation)."""
    ref_state, ref_metrics = step_results["one"][:2]
    state, metrics = step_results[name][:2]
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert int(state.step) == 1
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_state.params, step_results["initial"].params)
    assert min(jax.tree.leaves(moved)) > 1e-3  # every parameter was updated (lr 1e-2)
    for moment in ("mu", "nu"):  # mu = 0.1 g, nu = 0.001 g^2: the gradients themselves
        _assert_tree_close(optax.tree_utils.tree_get(state.opt_state, moment),
                           optax.tree_utils.tree_get(ref_state.opt_state, moment), rtol=1e-4, scale_atol=1e-5)
    # Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): where |g| ~ 1e-9 the
    # float32 rounding of the sharded sums moves it by a fraction of lr (seen: 0.4%).
    _assert_tree_close(state.params, ref_state.params, rtol=1e-5, atol=1e-2 * LR)


def test_step_on_cpu_gives_ynnpack_the_dots_only(step_results):
    """On a CPU the compiled step hands its dots, and none of its reductions, to YNNPACK
    (xla_cpu.py); the sharded-step test above runs with that option."""
    new, fns, batch = step_results["one"][2:]
    rng = step_rng(np.asarray(jax.random.key_data(jax.random.key(0))), 1)
    fusions = xla_cpu.library_fusions(fns.train_step.lower(new, batch, rng).compile().as_text())
    assert sum(n for (kind, ops), n in fusions.items() if "dot" in ops) >= 10
    assert not [ops for (kind, ops) in fusions if "reduce" in ops], fusions


def _assert_tree_close(a, b, rtol, atol=0.0, scale_atol=0.0):
    """|a - b| <= atol + scale_atol * max|b| + rtol * |b|, leaf by leaf (scale per leaf)."""
    def check(path, x, y):
        y = np.asarray(y, np.float64)
        tol = atol + scale_atol * np.abs(y).max() + rtol * np.abs(y)
        err = np.abs(np.asarray(x, np.float64) - y)
        assert (err <= tol).all(), f"{jax.tree_util.keystr(path)}: max error {err.max():.3g}"

    jax.tree_util.tree_map_with_path(check, a, b)


def test_layout_follows_the_rule_table(step_results):
    """data=2 x fsdp=2 x tensor=2: `embed` on fsdp, heads/mlp/vocab on tensor, the rest replicated."""
    state = step_results["born"]
    new, fns, batch = step_results["2x2x2"][2:]
    for s in (state, new):  # born sharded, and kept so by the step's out_shardings
        p = s.params
        expect = {
            ("enc_layers", "mlp", "wi_gate"): P(None, "fsdp", "tensor"),  # [L, D, F]
            ("enc_layers", "mlp", "wo"): P(None, "tensor", "fsdp"),  # [L, F, D]
            ("dec_layers", "self_attn", "q"): P(None, "fsdp", "tensor"),  # [L, D, H*K]
            ("dec_layers", "cross_attn", "o"): P(None, "tensor", "fsdp"),  # [L, H*K, D]
            ("enc_embed", "tokens"): P("tensor", "fsdp"),  # [512, D]
            ("dec_embed", "tokens"): P(None, "fsdp"),  # [33, D]: 33 rows do not split in 2
            ("lm_head",): P("fsdp"),  # [D, 33]
            ("dec_layers", "self_post", "scale"): P(),  # norms are replicated
        }
        mu = optax.tree_utils.tree_get(s.opt_state, "mu")
        nu = optax.tree_utils.tree_get(s.opt_state, "nu")
        for path, spec in expect.items():
            leaf, m, v = p, mu, nu
            for k in path:
                leaf, m, v = leaf[k], m[k], v[k]
            assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
            assert m.sharding.spec == spec and v.sharding.spec == spec, path  # moments follow
            assert leaf.dtype == m.dtype == jnp.float32
        wi = p["enc_layers"]["mlp"]["wi_gate"]
        assert wi.addressable_shards[0].data.shape == (2, 32, 48)  # [L, D/2, F/2]
        assert s.step.sharding.is_fully_replicated
    assert batch["labels"].sharding.spec == P(None, ("data", "fsdp"))
    assert fns.state_shardings.params["lm_head"].spec == P("fsdp")


def test_adafactor_and_bf16_shapes(data, tokenizer):
    """Adafactor's factored statistics are replicated; bf16 compute keeps fp32 master weights."""
    cfg = td.tiny_run(data, compute_dtype="bfloat16",
                      optimizer=tc.OptimizerConfig(name="adafactor", lr=1e-2, warmup_steps=0))
    mesh = make_mesh(2, 2, 2)
    fns, abstract, _ = _setup(cfg, mesh, tokenizer)
    assert abstract.params["enc_layers"]["mlp"]["wi_gate"].dtype == jnp.float32
    v_row = optax.tree_utils.tree_get(abstract.opt_state, "v_row")
    assert v_row["enc_layers"]["mlp"]["wi_gate"].sharding.is_fully_replicated
    batch = {k: jax.ShapeDtypeStruct((1, 8) + s, jnp.int32, sharding=fns.batch_sharding)
             for k, s in (("input_ids", (16,)), ("attention_mask", (16,)), ("labels", (16,)))}
    out, metrics = jax.eval_shape(fns.train_step, abstract, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert out.params["lm_head"].dtype == jnp.float32 and metrics["loss"].dtype == jnp.float32
