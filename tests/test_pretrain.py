"""backbone.pretrained=synthetic: pretrained once on a separate source set, exported in the
HF ResNetModel layout, loaded through the real importer, reused by every head."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, compose
from flax import nnx

from qtl.config import ConfigError
from qtl.data.source import load_splits
from qtl.data.synthetic import MARKER
from qtl.models.hf_import import load_pretrained
from qtl.models.resnet import ResNet
from qtl.studies.cxr import CxrStudy
from qtl.studies.pretrain import pretrain_config, save_hf_backbone, synthetic_pretrained


def test_export_import_roundtrip_is_exact(tmp_path):
    cfg = compose(*TINY)
    a = ResNet(cfg.backbone, rngs=nnx.Rngs(1))
    b = ResNet(cfg.backbone, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    assert not np.allclose(a(x), b(x))
    save_hf_backbone(a, tmp_path / "w")
    assert json.loads((tmp_path / "w" / "config.json").read_text())["model_type"] == "resnet"
    load_pretrained(b, str(tmp_path / "w"))
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_source_task_is_separate_from_target(synth_root):
    cfg = compose(*TINY, f"data.root={synth_root}", "task=cxr14", "head=dqc", "seed=3")
    src = pretrain_config(cfg)
    assert src.data.synth_seed != cfg.data.synth_seed
    assert src.data.root != cfg.data.root and src.task.name == "cxr19"
    assert src.head.name.value == "cdl" and src.seed == 0 and src.backbone.pretrained is None
    # the same artifact serves every head and seed
    other = pretrain_config(compose(*TINY, f"data.root={synth_root}", "head=cdl", "seed=0"))
    assert other == src


@pytest.mark.slow
def test_pretrained_once_then_cached(synth_root):
    cfg = compose(*TINY, f"data.root={synth_root}")
    load_splits(cfg.data, cfg.task.labels)  # the target set exists before pretraining
    target_marker = json.loads((Path(synth_root) / MARKER).read_text())
    out = synthetic_pretrained(cfg, CxrStudy())
    weights = out / "model.safetensors"
    assert weights.exists() and (out / "run" / "results.json").exists()
    stamp = weights.stat().st_mtime_ns
    assert (
        synthetic_pretrained(compose(*TINY, f"data.root={synth_root}", "head=cdl"), CxrStudy())
        == out
    )
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    assert json.loads((Path(synth_root) / MARKER).read_text()) == target_marker  # untouched


def test_synthetic_pretraining_refuses_real_data():
    cfg = compose(*TINY, "data=nih_cxr_lt", "data.root=/somewhere")
    with pytest.raises(ConfigError, match="microsoft/resnet-50"):
        pretrain_config(cfg)
