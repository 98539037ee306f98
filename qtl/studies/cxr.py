"""The CXR study: a ResNet backbone with a classical (CDL) or quantum (DQC) head, one sigmoid
(and one qubit) per label, on NIH-CXR-LT or the built-in synthetic chest X-rays; AUROC per
label; the head comparison report (paired t-tests over seeds per task)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qtl.config import ConfigError, DataName, HeadName, ModelName, QtlConfig
from qtl.record.schema import REAL, SYNTHETIC, Results
from qtl.studies.base import CardFacts, Predictable, Study
from qtl.train.driver import RunInputs


def format_auroc_table(results: Results) -> str:
    """Per-label AUROC per evaluated split, as a fixed-width text table."""
    splits = [s for s in ("val", "test", "external") if s in results.auroc]
    labels = results.labels
    width = max(len(x) for x in [*labels, "mean"])
    lines = [f"{'label':<{width}}  " + "  ".join(f"{s:>8}" for s in splits)]
    for name in [*labels, "mean"]:
        cells = []
        for s in splits:
            block = results.auroc[s]
            value = block.mean if name == "mean" else block.per_label.get(name)
            cells.append(f"{value:8.3f}" if value is not None else f"{'n/a':>8}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


class CxrStudy(Study):
    name: ClassVar[str] = "cxr"
    data_names: ClassVar[tuple[str, ...]] = ("synthetic", "nih_cxr_lt")
    model_names: ClassVar[tuple[str, ...]] = ("resnet_dqc",)
    # the MedMNIST study's model and distillation fields (data.flag etc. are MedMNIST's too,
    # but conf/data/synthetic.yaml shares them with the schema defaults, so they are left out
    # of the identity below rather than refused)
    foreign: ClassVar[tuple[str, ...]] = (
        "model.hidden_size",
        "model.num_heads",
        "model.num_blocks",
        "model.mlp_size",
        "model.patch_size",
        "model.dropout",
        "model.pool",
        "model.quantum",
        "model.match_params_of",
        "model.circuit.layers",
        "model.circuit.encoding",
        "model.circuit.rotation",
        "model.circuit.entangler",
        "model.circuit.init",
        "model.circuit.device.name",
        "model.cnn_stem",
        "model.cnn_widths",
        "model.cnn_depths",
        "distill.mode",
        "distill.temperature",
        "distill.alpha",
        "distill.pretrain_epochs",
        "distill.teacher",
        "distill.teacher_seed",
        "distill.teacher_epochs",
    )
    not_identity: ClassVar[tuple[str, ...]] = (
        "model.",
        "distill.",
        "data.flag",
        "data.size",
        "data.synthetic",
        "data.synth_noise",
        "data.check_split_sizes",
        "data.binary_logits",
    )

    def validate(self, cfg: QtlConfig) -> None:
        if cfg.model.name != ModelName.resnet_dqc:
            raise ConfigError(
                f"model={cfg.model.name} trains on data=medmnist only (the medmnist study); the "
                f"cxr study (data={cfg.data.name}) trains model=resnet_dqc with the backbone "
                "and head groups."
            )
        super().validate(cfg)
        synthetic = cfg.data.name == DataName.synthetic
        if cfg.data.synthetic != synthetic:  # it would not change the data, only mislabel it
            raise ConfigError(
                f"data.synthetic={str(cfg.data.synthetic).lower()} does not fit "
                f"data={cfg.data.name}: the CXR study's synthetic data is data=synthetic "
                "(data.synthetic=true), its real data data=nih_cxr_lt (data.synthetic=false)."
            )
        if cfg.head.name == HeadName.dqc and cfg.head.device.name is not None:
            from qtl.models.heads import circuit_spec
            from qtl.quantum.device import check_device

            check_device(circuit_spec(cfg.head, len(cfg.task.labels)), cfg.head, "head")

    def data_source(self, cfg: QtlConfig) -> str:
        """synthetic (data=synthetic: qtl's generated CXR-LT) | real (data=nih_cxr_lt)."""
        return SYNTHETIC if cfg.data.name == DataName.synthetic else REAL

    def data_content(self, cfg: QtlConfig) -> dict[str, str]:
        """NIH-CXR-LT's label CSVs and image manifest (and MIMIC-CXR-LT's); nothing for the
        synthetic set, whose generator settings are identity fields."""
        from qtl.data.content import cxr_digests
        from qtl.utils import paths

        return cxr_digests(cfg.data, cfg.task.labels, paths.cache_dir(cfg.paths) / "content")

    def run_label(self, cfg: Any) -> str:
        return f"{cfg.task.name}-{cfg.head.name}"

    def wandb_tags(self, cfg: QtlConfig) -> list[str]:
        return [cfg.task.name, cfg.head.name.value, f"seed{cfg.seed}"]

    def start(self, cfg: QtlConfig) -> dict[str, Any]:
        from qtl.studies.pretrain import resolve_weights

        return {"weights": resolve_weights(cfg, self)}

    def provenance(self, cfg: QtlConfig, **start: Any) -> dict[str, Any]:
        from qtl.models.classifier import weights_provenance

        return weights_provenance(cfg, start.get("weights"))

    def inputs(self, cfg: QtlConfig, run_dir: Path, show: bool, **start: Any) -> RunInputs:
        from qtl.data.cache import cached_splits, write_skipped
        from qtl.data.source import load_splits
        from qtl.models.classifier import build_model, parameter_table
        from qtl.utils import paths

        labels = list(cfg.task.labels)
        # a weights problem: before data work
        model = build_model(cfg, cfg.seed, weights=start.get("weights"))
        table = parameter_table(model, cfg)
        splits = load_splits(
            cfg.data, labels, progress=show, check_files=False, data_dir=paths.data_dir(cfg.paths)
        )
        t_data = time.perf_counter()
        if cfg.features.cache:  # frozen backbone: the head trains on features computed once
            from qtl.train.features import cached_features

            cached = cached_features(cfg, model.backbone, splits, progress=show)
        else:
            cached = cached_splits(cfg.data, splits, progress=show)  # fills what the cache lacks
        splits = cached.splits  # without the images skipped by data.on_bad_image=skip
        if cached.skipped_ids():
            write_skipped(run_dir / "skipped_images.json", cached)
        arrays: dict[str, tuple[Any, np.ndarray]] = {
            name: (cached.images[name], split.labels.astype(np.float32))
            for name, split in splits.items()
        }
        return RunInputs(
            model=model,
            table=table,
            arrays=arrays,
            labels={name: y for name, (_, y) in arrays.items()},
            ids={name: split.ids for name, split in splits.items()},
            label_names=labels,
            score_names=None,
            objective=None,
            data_seconds=time.perf_counter() - t_data,
            record={
                "task": cfg.task.name,
                "head": cfg.head.name.value,
                "data_source": self.data_source(cfg),
                "quantum_noise": _noise_record(cfg, len(labels)),
                # positives per label in train: the report sorts labels by this frequency
                "train_label_counts": dict(
                    zip(labels, (int(c) for c in splits["train"].labels.sum(axis=0)), strict=True)
                ),
            },
            skipped=cached.skipped_ids(),
        )

    def predictable(self, cfg: QtlConfig) -> Predictable:
        """ResNet + head; grayscale, resize + centre crop, copied to 3 channels, ImageNet
        mean/std (qtl.data.preprocess), one sigmoid per label."""
        from flax import nnx

        from qtl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
        from qtl.models.classifier import Classifier
        from qtl.train.objectives import Objective

        labels = list(cfg.task.labels)
        weights = self.start(cfg)["weights"] if cfg.features.cache else None
        return Predictable(
            model=Classifier(cfg, rngs=nnx.Rngs(0)),
            objective=Objective(),
            outputs=labels,
            descriptions=labels,
            preprocessing={
                "kind": "resize_crop",
                "color": "gray",
                "resize": int(cfg.data.resize),
                "crop": int(cfg.data.crop),
                "model_input": "gray copied to 3 channels, x / 255, then (x - mean) / std",
                "channels": 3,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            task="multi-label",
            backbone_weights=weights,
        )

    def card_facts(self, results: Results, outputs: list[str], task: str) -> CardFacts:
        cfg = results.config
        head = cfg.get("head", {})
        what = (
            f"{cfg.get('backbone', {}).get('name')} backbone + {results.head} head on "
            f"{results.task} ({len(outputs)} labels)"
        )
        quantum = results.head == "dqc"
        if quantum:
            what += f", a circuit of {len(outputs)} qubits, depth {head.get('depth')}"
        return CardFacts(what, "NIH-CXR-LT (NIH ChestX-ray14 images)", head if quantum else None)

    def format_scores(self, results: Results) -> str:
        return format_auroc_table(results)

    def describe(self, cfg: QtlConfig) -> list[tuple[str, int]]:
        from qtl.config import HeadName
        from qtl.models.classifier import abstract_model, parameter_table

        rows = parameter_table(abstract_model(cfg), cfg)
        n = len(cfg.task.labels)
        print(
            f"qtl model: task={cfg.task.name} ({n} labels) head={cfg.head.name.value} "
            f"backbone={cfg.backbone.name}"
            + (f" depth={cfg.head.depth} qubits={n}" if cfg.head.name == HeadName.dqc else "")
        )
        width = max(len(name) for name, _ in rows)
        print(f"{'component':<{width}}  {'parameters':>12}")
        for name, count in rows:
            print(f"{name:<{width}}  {count:>12,}")
        return rows


def _noise_record(cfg: QtlConfig, n_qubits: int) -> dict[str, Any]:
    """The DQC head's shots and noise for results.json; empty when it is exact (or no DQC)."""
    from qtl.models.heads import circuit_spec
    from qtl.quantum.noise import describe, is_active

    if cfg.head.name != HeadName.dqc or not is_active(cfg.head):
        return {}
    return describe(circuit_spec(cfg.head, n_qubits), cfg.head)
