"""``backbone.pretrained=synthetic``: a stand-in for ImageNet weights where none can be fetched
(an application of the trainer: it trains a model, so the model layer only loads its output).

The study is *transfer* learning: the quantum head sits on a pretrained backbone. A backbone
trained from scratch through the dressed circuit barely learns (each <Z_i> after the CNOT
ring is a parity of several qubits, so its gradient is a product of small factors), so the
demo needs pretrained weights too. Here they come from a separate synthetic *source*
dataset (its own seed, all 19 labels, classical head), trained once with qtl's own trainer
and cached. They are written in transformers' ``ResNetModel`` safetensors layout and loaded
through the same importer as ``microsoft/resnet-50``, and shared by every head and seed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from qtl.config import (
    BatchNormMode,
    ConfigError,
    DataName,
    FeaturesConfig,
    HeadConfig,
    HeadName,
    LoggerConfig,
    Mode,
    QtlConfig,
    TaskConfig,
    TrainConfig,
)
from qtl.labels import CXR19
from qtl.models.classifier import SYNTHETIC
from qtl.studies.base import Study
from qtl.utils import paths
from qtl.utils.files import atomic_write_bytes, atomic_write_text, file_lock

if TYPE_CHECKING:
    from qtl.models.classifier import Classifier
    from qtl.models.resnet import ResNet

SOURCE_SEED_OFFSET = 1000  # the source dataset's seed: data.synth_seed + this


def pretrain_config(cfg: QtlConfig) -> QtlConfig:
    """The source task: same backbone shape and preprocessing, other images, 19 labels, CDL."""
    if cfg.data.name != DataName.synthetic:
        raise ConfigError(
            "backbone.pretrained=synthetic pretrains on synthetic images and is meant for "
            "data=synthetic; with real data use backbone.pretrained=microsoft/resnet-50 "
            "(or a local folder with its model.safetensors)."
        )
    src = copy.deepcopy(cfg)
    src.mode = Mode.train
    src.name = "pretrain"
    src.seed = 0  # one fixed artifact, like ImageNet weights: not per run seed
    src.task = TaskConfig(name="cxr19", labels=list(CXR19))
    src.head = HeadConfig(name=HeadName.cdl)
    src.backbone.pretrained = None
    src.backbone.freeze = False
    src.backbone.batch_norm = BatchNormMode.batch
    src.data.synth_seed = cfg.data.synth_seed + SOURCE_SEED_OFFSET
    # never write the source set over the target set: its own folder next to data.root
    src.data.root = f"{cfg.data.root.rstrip('/')}-source" if cfg.data.root else None
    src.data.limit = None
    # how the target run trains (augmented or on cached features) is not the source recipe's:
    # a frozen-feature run and a fine-tuned one start from the same pretrained backbone
    src.data.augment = True
    src.features = FeaturesConfig()
    # a fixed recipe, independent of how the target run fine-tunes (like ImageNet weights)
    src.train = TrainConfig(
        lr=cfg.backbone.pretrain_lr,
        batch_size=32,
        max_epochs=cfg.backbone.pretrain_epochs,
        patience=max(cfg.backbone.pretrain_epochs, 1),  # keep the best epoch of the budget
    )
    src.logger = LoggerConfig()
    return src


def save_hf_backbone(backbone: ResNet, out_dir: Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` as transformers' ResNetModel would."""
    from safetensors.numpy import save

    from qtl.models.hf_import import to_torch_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["ResNetModel"],
        "model_type": "resnet",
        "num_channels": 3,
        "embedding_size": backbone.embedding_size,
        "hidden_sizes": list(backbone.hidden_sizes),
        "depths": list(backbone.depths),
        "layer_type": str(getattr(backbone.layer_type, "value", backbone.layer_type)),
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
    }
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    blob = save(to_torch_state_dict(backbone), metadata={"format": "pt"})
    atomic_write_bytes(out_dir / "model.safetensors", blob)  # present => complete
    return out_dir


def resolve_weights(cfg: QtlConfig, study: Study) -> str | None:
    """What ``backbone.pretrained`` names, as a hub id or a folder the model layer can load:
    ``synthetic`` becomes its cached folder (pretrained here first, as a run of ``study``,
    if it is not there yet)."""
    source = cfg.backbone.pretrained
    if source == SYNTHETIC:
        return str(synthetic_pretrained(cfg, study))
    return source or None


def build_pretrained_model(cfg: QtlConfig, seed: int, study: Study) -> Classifier:
    """The run's model with its starting weights resolved (what the train app builds)."""
    from qtl.models.classifier import build_model

    return build_model(cfg, seed, weights=resolve_weights(cfg, study))


def synthetic_pretrained(cfg: QtlConfig, study: Study) -> Path:
    """Folder with the pretrained backbone for ``cfg`` (trained on first use as a run of
    ``study``, the CXR study, then cached; keyed by every schema identity field, as before
    studies chose their identity, so existing folders are found)."""
    from qtl.record.identity import fingerprint
    from qtl.train.driver import train_and_evaluate

    src = pretrain_config(cfg)
    out = paths.pretrained_dir(cfg.paths) / f"{cfg.backbone.name}-{fingerprint(src)}"
    if (out / "model.safetensors").exists():
        return out
    with file_lock(out.with_suffix(".lock")):
        if (out / "model.safetensors").exists():
            return out
        print(
            f"[qtl] backbone.pretrained=synthetic: pretraining {cfg.backbone.name} once on a "
            f"separate synthetic source set (19 labels, synth_seed={src.data.synth_seed}); "
            f"cached in {out}"
        )
        train_and_evaluate(src, out / "run", study, weights=None)
        save_hf_backbone(_best_backbone(src, out / "run"), out)
    return out


def _best_backbone(src: QtlConfig, run_dir: Path) -> ResNet:
    from flax import nnx

    from qtl.models.classifier import build_model
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.step import init_state, make_steps

    model = build_model(src, src.seed, weights=None)
    steps = make_steps(model, src)
    ckpts = Checkpoints(run_dir / "checkpoints")
    try:
        best, _ = ckpts.restore("best", init_state(model, src, steps.tx))
    finally:
        ckpts.close()
    return nnx.merge(steps.eval_graph, best.params, best.rest).backbone
