"""ViT / QViT: parameter counts of the presets, FLOPs, the quantum layer against PennyLane, and a
tiny jitted train step per MedMNIST task type on synthetic data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qtl.data.medmnist import load_medmnist, normalise
from qtl.data.medmnist_info import INFO
from qtl.data.medmnist_synthetic import write_synthetic
from qtl.models.vit import ViT, build_vit
from qtl.models.vit_config import (
    PROJECTIONS,
    ViTConfig,
    equal_dims_vit,
    qvit_preset,
    validate_vit,
    vit_config,
)
from qtl.models.vit_costs import (
    describe_pair,
    match_parameter_count,
    module_parameter_table,
    parameter_count,
    resolve,
    vit_costs,
    xla_flops,
)
from qtl.quantum.layer import QuantumLayer, QuantumLayerConfig
from qtl.train.objectives import distill_loss, label_loss, n_outputs

ATOL = 1e-5


def _abstract(cfg: ViTConfig, shape, n_out) -> ViT:
    return nnx.eval_shape(lambda: ViT(cfg, shape, n_out, rngs=nnx.Rngs(0)))


def test_counts_reproduce_the_public_qvit_design():
    """Comajoan Cara et al.: hidden 8, 2 heads, 4 blocks, MLP 4, patch 10 on 125^2 x 3, two
    classes -> 5,178 parameters classical, 4,170 with quantum Q/K/V/O and MLP (their public
    QuantumTransformers code)."""
    cfg = ViTConfig(hidden_size=8, num_heads=2, num_blocks=4, mlp_size=4, patch_size=10)
    shape = (125, 125, 3)
    classical = replace(cfg, quantum=[])
    assert parameter_count(classical, shape, 2) == 5178
    assert parameter_count(cfg, shape, 2) == 4170
    for c in (cfg, classical):
        table = module_parameter_table(_abstract(c, shape, 2))
        assert sum(table.values()) == parameter_count(c, shape, 2)


def vit_preset() -> ViTConfig:
    """``model=vit`` as a run composes it (conf/model/vit.yaml over the schema)."""
    from conftest import compose

    return vit_config(compose("data=medmnist", "model=vit").model)


@pytest.mark.parametrize("flag", ["retinamnist", "chestmnist", "breastmnist"])
def test_presets_match_in_parameters_and_module_equals_analytic(flag):
    info = INFO[flag]
    shape, n_out = (28, 28, info.channels), n_outputs(info)
    qvit, vit = qvit_preset(), resolve(vit_preset(), shape, n_out)
    assert vit.quantum == [] and vit.match_params_of is None
    q_count, c_count = parameter_count(qvit, shape, n_out), parameter_count(vit, shape, n_out)
    print(
        f"{flag}: QViT {q_count:,d} vs ViT {c_count:,d} parameters "
        f"(ViT hidden {vit.hidden_size}, MLP {vit.mlp_size})"
    )
    assert abs(q_count - c_count) / q_count < 0.03
    for cfg in (qvit, vit):
        analytic = {r.name: r.params for r in vit_costs(cfg, shape, n_out).rows if r.params}
        assert module_parameter_table(_abstract(cfg, shape, n_out)) == analytic
    if flag == "retinamnist":  # the preset's own numbers (conf/model/qvit.yaml, vit.yaml)
        assert (q_count, c_count, vit.hidden_size, vit.mlp_size) == (1421, 1437, 4, 17)


def test_matching_searches_hidden_and_mlp_only():
    cfg = replace(vit_preset(), num_blocks=2, patch_size=7)
    matched, count, target = match_parameter_count(cfg, (28, 28, 3), 9)
    assert target == parameter_count(
        replace(qvit_preset(), num_blocks=2, patch_size=7), (28, 28, 3), 9
    )
    assert (matched.num_heads, matched.num_blocks, matched.patch_size) == (2, 2, 7)
    assert matched.hidden_size % 2 == 0 and count == parameter_count(matched, (28, 28, 3), 9)
    # no other (hidden, mlp) in the documented range (hidden <= 2x 8, MLP <= 4x max) is closer
    for hidden in range(2, 17, 2):
        for mlp in range(1, 4 * max(hidden, 8) + 1):
            other = replace(matched, hidden_size=hidden, mlp_size=mlp)
            assert abs(parameter_count(other, (28, 28, 3), 9) - target) >= abs(count - target)


def test_describe_pair_prints_counts_flops_and_gates():
    text, numbers = describe_pair(
        qvit_preset(), vit_preset(), (28, 28, 3), 5, teacher={"params": 11e6, "flops": 1e9}
    )
    assert "QViT (1,421 parameters)" in text and "ViT (1,437 parameters)" in text
    assert "fewer parameters" in text and "teacher" in text and "equal dims" in text
    q = numbers["qvit"]
    # 4 blocks x 4 projections x 49 tokens circuits of 8 qubits, one RX layer + 8-CNOT ring
    att = q["attention projections (quantum)"]
    assert att["circuits"] == 4 * 4 * 49 and att["qubits"] == 8
    assert att["gates_1q"] == 4 * 4 * 49 * 8 * 2 and att["gates_2q"] == 4 * 4 * 49 * 8
    assert att["flops"] == 0 and q["MLP (quantum)"]["qubits"] == 4
    assert numbers["vit"]["total"]["circuits"] == 0


def test_analytic_flops_agree_with_xla():
    cfg = replace(equal_dims_vit(qvit_preset()), hidden_size=16, mlp_size=32, dropout=0.0)
    model = nnx.eval_shape(lambda: ViT(cfg, (28, 28, 3), 5, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    counted = xla_flops(lambda s, x: nnx.merge(graph, s)(x), state, jnp.zeros((1, 28, 28, 3)))
    analytic = vit_costs(cfg, (28, 28, 3), 5).total.flops
    assert counted is not None and abs(counted - analytic) / analytic < 0.15, (counted, analytic)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.hidden_size=6 does not divide"):
        validate_vit(ViTConfig(hidden_size=6, num_heads=4))
    with pytest.raises(ValueError, match="model.quantum"):
        validate_vit(ViTConfig(quantum=["q", "ffn"]))
    with pytest.raises(ValueError, match="model.mlp_size must be >= 2"):
        validate_vit(ViTConfig(mlp_size=1))
    with pytest.raises(ValueError, match="model.circuit.encoding='rz'"):
        validate_vit(ViTConfig(circuit=QuantumLayerConfig(encoding="rz")))
    with pytest.raises(ValueError, match="patch_size=32 is larger"):
        ViT(ViTConfig(patch_size=32), (28, 28, 1), 2, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- vs PennyLane


@pytest.mark.parametrize("layers", [1, 2])
def test_quantum_layer_fast_equals_pennylane(layers):
    """(B, T, d) through the layer: <Z> and gradients w.r.t. inputs and weights."""
    x = jnp.asarray(np.random.default_rng(layers).normal(size=(2, 3, 4)), jnp.float32)
    readout = jnp.asarray(np.random.default_rng(9).normal(size=(2, 3, 4)), jnp.float32)
    results = {}
    for sim in ("fast", "pennylane"):
        layer = QuantumLayer(4, QuantumLayerConfig(layers=layers, simulator=sim), rngs=nnx.Rngs(5))
        graph, params = nnx.split(layer)

        def loss(p, x, graph=graph):
            return jnp.sum(nnx.merge(graph, p)(x) * readout)

        z = jax.jit(lambda p, x, graph=graph: nnx.merge(graph, p)(x))(params, x)
        results[sim] = (z, *jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
    for a, b in zip(
        jax.tree.leaves(results["fast"]), jax.tree.leaves(results["pennylane"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL)
    assert results["fast"][0].shape == (2, 3, 4)


@pytest.mark.slow
def test_qvit_fast_equals_pennylane_end_to_end():
    """The same seeded QViT on both simulators: logits and every parameter's gradient."""
    cfg = ViTConfig(hidden_size=4, num_heads=2, num_blocks=1, mlp_size=2, patch_size=4, dropout=0.0)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray([[0], [2]])
    out = {}
    for sim in ("fast", "pennylane"):
        c = replace(cfg, circuit=QuantumLayerConfig(simulator=sim))
        model = ViT(c, (8, 8, 1), 3, rngs=nnx.Rngs(params=3, dropout=0))
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, graph=graph, rest=rest):
            return label_loss("multi-class", nnx.merge(graph, p, rest)(images), labels)

        out[sim] = jax.jit(jax.value_and_grad(loss))(params)
    flat_fast = jax.tree_util.tree_leaves_with_path(out["fast"])
    for (path, a), b in zip(flat_fast, jax.tree.leaves(out["pennylane"]), strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------- training


def _tiny(flag: str, tmp_path):
    write_synthetic(tmp_path, flag, 28, sizes={"train": 32, "val": 4, "test": 4}, seed=1)
    data = load_medmnist(tmp_path, flag)
    split = data.splits["train"]
    cfg = ViTConfig(hidden_size=4, num_heads=2, num_blocks=1, mlp_size=4, patch_size=7, dropout=0.0)
    n_out = n_outputs(data.info)
    return data.info, cfg, jnp.asarray(normalise(split.images)), jnp.asarray(split.labels), n_out


def _train(model, loss_of_logits, images, labels, steps: int = 10, lr: float = 0.03):
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        loss, grads = nnx.value_and_grad(lambda m: loss_of_logits(m(images), labels))(model)
        optimizer.update(model, grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        return loss, finite

    losses = []
    for _ in range(steps):
        loss, finite = step(model, optimizer, images, labels)
        assert bool(finite) and np.isfinite(float(loss))
        losses.append(float(loss))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["pathmnist", "retinamnist", "breastmnist", "chestmnist"])
def test_qvit_train_step_per_task_type_lowers_the_loss(flag, tmp_path):
    """One jitted step per task type (multi-class, ordinal, binary, multi-label) on real-format
    synthetic files: finite gradients, and the loss falls over a few steps on one batch."""
    info, cfg, images, labels, n_out = _tiny(flag, tmp_path)
    model = build_vit(cfg, (28, 28, info.channels), n_out, seed=0)
    losses = _train(model, lambda z, y: label_loss(info.task, z, y), images, labels)
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.slow
def test_kd_train_step_moves_the_student_towards_the_teacher(tmp_path):
    info, cfg, images, labels, n_out = _tiny("dermamnist", tmp_path)
    teacher = jnp.asarray(np.random.default_rng(0).normal(0, 2, (len(images), n_out)), jnp.float32)
    model = build_vit(cfg, (28, 28, 3), n_out, seed=0)

    def loss(z, y):
        return distill_loss(info.task, z, teacher, y, temperature=2.0, alpha=1.0)

    losses = _train(model, loss, images, labels)
    assert losses[-1] < losses[0] - 0.02, losses


def _compose_group(tmp_path, group: str, option: str):
    """``group=option`` from the real conf/ files, composed by Hydra on their own (the drafts
    are not in the root config's defaults yet)."""
    import shutil

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "conf"
    shutil.copytree(root / group, tmp_path / group)
    (tmp_path / "config.yaml").write_text(f"defaults:\n  - {group}: {option}\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config")[group])


@pytest.mark.parametrize("option", ["qvit", "vit"])
def test_model_yaml_drafts_are_the_presets(tmp_path, option):
    """What a run builds (the group file over the schema's defaults) is the model layer's
    preset: the QViT benchmark's model, and the same layout classical for model=vit."""
    from conftest import compose
    from omegaconf import OmegaConf

    loaded = _compose_group(tmp_path, "model", option)
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ViTConfig), loaded))
    run = vit_config(compose("data=medmnist", f"model={option}").model)
    preset = qvit_preset()
    if option == "vit":
        preset = replace(preset, name="vit", quantum=[], match_params_of=list(PROJECTIONS))
    assert typed == run == preset


@pytest.mark.slow
def test_bench_times_both_pairs_and_records_the_load():
    from qtl.bench.qvit import run_bench

    cfg = ViTConfig(hidden_size=4, num_heads=2, num_blocks=1, mlp_size=2, patch_size=4)
    out = run_bench(cfg, (8, 8, 1), 2, batch=2, steps=3, max_seconds=5)
    assert out["vit_step"]["quantum"] == [] and out["qvit_step"]["quantum"] == cfg.quantum
    assert out["qvit_over_vit"] > 0 and out["pennylane_over_fast"] > 0
    assert out["setup"]["layer_rows"] == 2 * 4 and "load average" in out["uptime_start"]
