"""The NNX ResNet backbone and the Hugging Face weight import.

The parity tests are the proof that ``qtl.models.resnet`` *is* transformers' ResNet: same
weights (random, with random BN statistics so a batch-norm mistake shows) give the same pooled
features. Models are tiny and built once per module: building costs seconds of compilation per
new set of shapes on CPU, running them milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from qtl.config import BackboneConfig, BatchNormMode, ConfigError, LayerType
from qtl.models.hf_import import load_pretrained, to_torch_state_dict
from qtl.models.resnet import ResNet

EMBEDDING = 8
DEPTHS = [1, 2, 1]
HIDDEN = {"bottleneck": [16, 32, 64], "basic": [8, 16, 32]}
TOL = 1e-4


def _cfg(layer_type: str, **overrides) -> BackboneConfig:
    return BackboneConfig(
        name=f"tiny_{layer_type}",
        layer_type=LayerType(layer_type),
        embedding_size=EMBEDDING,
        hidden_sizes=list(HIDDEN[layer_type]),
        depths=list(DEPTHS),
        **overrides,
    )


def _n_params(model: ResNet) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@nnx.jit
def _forward(model: ResNet, x: jax.Array) -> jax.Array:
    return model(x)


def _batch_stats(model: ResNet) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two random 64x64 images, NHWC."""
    return np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def models() -> dict[str, ResNet]:
    """One tiny random model per layer type (1x1 convs as matmuls, inference BN)."""
    return {lt: ResNet(_cfg(lt), rngs=nnx.Rngs(0)) for lt in HIDDEN}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory, images) -> dict[str, tuple[Path, np.ndarray]]:
    """Per layer type: a folder written by transformers' save_pretrained, and its features."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = {}
    for i, (layer_type, hidden) in enumerate(HIDDEN.items()):
        torch.manual_seed(i)
        hf_cfg = transformers.ResNetConfig(
            num_channels=3,
            embedding_size=EMBEDDING,
            hidden_sizes=hidden,
            depths=DEPTHS,
            layer_type=layer_type,
        )
        model = transformers.ResNetModel(hf_cfg).eval()
        with torch.no_grad():  # non-trivial BN: wrong statistics or affine would show
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                    m.running_mean.normal_(0.0, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
            x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            features = model(x).pooler_output.flatten(1).numpy()
        folder = tmp_path_factory.mktemp(f"hf_{layer_type}")
        model.save_pretrained(folder)
        out[layer_type] = (folder, features)
    return out


# --- parameter counts -------------------------------------------------------------------------


def test_resnet50_param_count_matches_hf() -> None:
    model = nnx.eval_shape(lambda: ResNet(BackboneConfig(name="resnet50"), rngs=nnx.Rngs(0)))
    assert _n_params(model) == 23_508_032
    assert model.num_features == 2048
    # running statistics are BatchStat, so an optimiser over Params never sees them
    stats = nnx.state(model, nnx.BatchStat)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(stats)) == 53_120
    names = {str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names == {"kernel", "scale", "bias"}


def test_small_preset_param_count() -> None:
    cfg = BackboneConfig(
        name="resnet_small",
        layer_type=LayerType.basic,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[2, 2, 2, 2],
    )
    model = nnx.eval_shape(lambda: ResNet(cfg, rngs=nnx.Rngs(0)))
    n = _n_params(model)
    print(f"resnet_small backbone: {n:,} parameters")
    assert n == 702_096
    assert model.num_features == 128


# --- parity with transformers -----------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("as_matmul", [True, False], ids=["matmul1x1", "conv1x1"])
@pytest.mark.parametrize("layer_type", list(HIDDEN))
def test_features_match_transformers(layer_type, as_matmul, hf_checkpoints, images, models) -> None:
    folder, expected = hf_checkpoints[layer_type]
    if as_matmul:
        model = models[layer_type]  # built already; a second build of new shapes costs seconds
    else:
        model = ResNet(_cfg(layer_type, conv1x1_as_matmul=False), rngs=nnx.Rngs(1))
    report = load_pretrained(model, str(folder))
    assert report["n_loaded"] == len(nnx.to_flat_state(nnx.state(model)))
    got = np.asarray(_forward(model, jnp.asarray(images)))
    assert got.shape == expected.shape == (2, HIDDEN[layer_type][-1])
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.torch
def test_loads_classification_checkpoint(hf_checkpoints, images, models, tmp_path) -> None:
    """The hub file is ResNetForImageClassification: ``resnet.`` prefix plus a classifier."""
    folder, expected = hf_checkpoints["bottleneck"]
    tensors = {f"resnet.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    tensors["classifier.1.weight"] = np.zeros((1000, 64), np.float32)
    tensors["classifier.1.bias"] = np.zeros((1000,), np.float32)
    file = tmp_path / "classifier.safetensors"
    save_file(tensors, str(file))
    report = load_pretrained(models["bottleneck"], str(file))
    assert report["n_ignored"] >= 2
    got = np.asarray(_forward(models["bottleneck"], jnp.asarray(images)))
    assert np.abs(got - expected).max() <= TOL


# --- round trip and errors (no torch needed) --------------------------------------------------


def test_export_round_trip(models, images, tmp_path) -> None:
    save_file(to_torch_state_dict(models["basic"]), str(tmp_path / "model.safetensors"))
    fresh = ResNet(_cfg("basic", conv1x1_as_matmul=False), rngs=nnx.Rngs(7))
    load_pretrained(fresh, str(tmp_path))
    x = jnp.asarray(images)
    np.testing.assert_allclose(_forward(fresh, x), _forward(models["basic"], x), atol=1e-5)


def test_shape_mismatch_names_key_and_field(models, tmp_path) -> None:
    tensors = to_torch_state_dict(models["basic"])
    key = "embedder.embedder.convolution.weight"
    tensors[key] = np.zeros((12, 3, 7, 7), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        load_pretrained(models["basic"], str(tmp_path))
    msg = str(err.value)
    assert key in msg and "(8, 3, 7, 7)" in msg and "(12, 3, 7, 7)" in msg
    assert "backbone.embedding_size" in msg


def test_other_layer_type_is_reported(models, tmp_path) -> None:
    save_file(to_torch_state_dict(models["basic"]), str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        load_pretrained(models["bottleneck"], str(tmp_path))
    msg = str(err.value)
    assert "backbone.layer_type" in msg and "missing key" in msg


def test_config_json_disagreeing_with_backbone(models, tmp_path) -> None:
    save_file(to_torch_state_dict(models["basic"]), str(tmp_path / "model.safetensors"))
    hf = {"layer_type": "basic", "embedding_size": 8, "hidden_sizes": [8, 16, 64]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=r"backbone\.hidden_sizes"):
        load_pretrained(models["basic"], str(tmp_path))


def test_missing_local_path(models, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"backbone\.pretrained"):
        load_pretrained(models["basic"], str(tmp_path / "no_such_dir"))
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        load_pretrained(models["basic"], str(tmp_path))  # exists, but holds no weights


def test_hub_without_network(models, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        load_pretrained(models["basic"], "qtl-tests/no-such-resnet")
    msg = str(err.value)
    assert "backbone.pretrained" in msg and "download" in msg and "null" in msg


# --- batch-norm modes -------------------------------------------------------------------------


def test_inference_bn_ignores_training_mode(models, images) -> None:
    model = models["basic"]
    x = jnp.asarray(images)
    before = _batch_stats(model)
    eval_out = _forward(model, x)
    model.train()
    try:
        train_out = _forward(model, x)
    finally:
        model.eval()
    for a, b in zip(before, _batch_stats(model), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(eval_out, train_out)


def test_batch_bn_updates_running_stats_in_training(images) -> None:
    model = ResNet(_cfg("basic", batch_norm=BatchNormMode.batch), rngs=nnx.Rngs(0))
    x = jnp.asarray(images)
    before = _batch_stats(model)
    _forward(model, x)  # built in eval mode: running statistics, no update
    for a, b in zip(before, _batch_stats(model), strict=True):
        np.testing.assert_array_equal(a, b)
    model.train()
    _forward(model, x)
    changed = [not np.array_equal(a, b) for a, b in zip(before, _batch_stats(model), strict=True)]
    assert all(changed)
    # under a (jitted) gradient w.r.t. Params the statistics still update, and get no gradient
    after_forward = _batch_stats(model)
    grad_fn = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.Param)))
    grads = grad_fn(model)
    assert not jax.tree.leaves(nnx.state(grads, nnx.BatchStat))
    assert not any(
        np.array_equal(a, b) for a, b in zip(after_forward, _batch_stats(model), strict=True)
    )
