"""The MedMNIST study (``data=medmnist``): QViT vs a ViT of equal parameter count, from
scratch and distilled from a ResNet-18 teacher; MedMNIST's AUC and ACC per dataset; the
models x distillation report (:mod:`qtl.studies.medmnist_report`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from qtl.config import ConfigError, DistillMode, ModelName, QtlConfig
from qtl.record.schema import REAL, SYNTHETIC, Results
from qtl.studies.base import CardFacts, Predictable, Study
from qtl.train.driver import RunInputs

_MODELS = "model=vit | model=qvit | model=resnet18"


def format_medmnist_table(results: Results) -> str:
    """AUC and ACC per evaluated split of a MedMNIST run."""
    lines = [f"{'split':<6}  {'AUC':>7}  {'ACC':>7}"]
    for split, m in results.metrics.items():
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        lines.append(f"{split:<6}  {auc:>7}  {m['acc']:7.3f}")
    return "\n".join(lines)


class MedmnistStudy(Study):
    name: ClassVar[str] = "medmnist"
    data_names: ClassVar[tuple[str, ...]] = ("medmnist",)
    model_names: ClassVar[tuple[str, ...]] = ("vit", "qvit", "resnet18")
    # the CXR study's fields that would act silently (or not at all) on a ViT/QViT/ResNet-18;
    # fields whose default comes from the root's group choice (task.*, head.name, backbone's
    # shape and weights) cannot be told from a choice made here: they are left out of the
    # identity below instead
    foreign: ClassVar[tuple[str, ...]] = (
        "backbone.freeze",
        "backbone.batch_norm",
        "train.backbone_lr",
        "head.depth",
        "head.theta_init",
        "head.entangler",
        "head.rotation",
        "head.simulator",
        "head.max_state_mb",
        "head.native_kernel",
        "head.device.name",
        "features.cache",
    )
    # what does not define a MedMNIST run: the CXR task, head and backbone, the CXR images'
    # preprocessing and augmentation (data.augment=false is required, so its knobs are inert),
    # and the feature cache (refused above)
    not_identity: ClassVar[tuple[str, ...]] = (
        "task.",
        "head.",
        "backbone.",
        "features.",
        "train.backbone_lr",
        "data.image_dir",
        "data.external_csv",
        "data.external_root",
        "data.resize",
        "data.crop",
        "data.hflip_p",
        "data.max_rotation_deg",
        "data.on_bad_image",
        "data.synth_image_px",
        "data.synth_difficulty",
    )

    def validate(self, cfg: QtlConfig) -> None:
        if cfg.model.name == ModelName.resnet_dqc:
            raise ConfigError(
                f"data=medmnist needs a MedMNIST model ({_MODELS}); model=resnet_dqc is the "
                "cxr study's backbone + head. E.g. python launch.py data=medmnist model=qvit"
            )
        super().validate(cfg)
        if str(cfg.data.name) not in self.data_names:
            raise ConfigError(
                f"model={cfg.model.name} trains on data=medmnist only (the medmnist study); "
                f"data={cfg.data.name} is the cxr study's data, trained by model=resnet_dqc "
                "with the backbone and head groups."
            )
        m, d = cfg.model, cfg.distill
        checks: list[tuple[str, Any, bool]] = [
            ("data.size", cfg.data.size, cfg.data.size in (28, 64, 128, 224)),
            ("data.binary_logits", cfg.data.binary_logits, cfg.data.binary_logits in (1, 2)),
            ("data.synth_noise", cfg.data.synth_noise, cfg.data.synth_noise >= 0),
            ("distill.temperature", d.temperature, d.temperature > 0),
            ("distill.alpha", d.alpha, 0.0 <= d.alpha <= 1.0),
            ("distill.pretrain_epochs", d.pretrain_epochs, d.pretrain_epochs >= 0),
            ("distill.teacher_epochs", d.teacher_epochs, (d.teacher_epochs or 1) > 0),
            ("model.cnn_stem", m.cnn_stem, m.cnn_stem > 0),
        ]
        for key, value, ok in checks:
            if not ok:
                raise ConfigError(f"{key}={value} is out of range.")
        if cfg.data.augment:
            raise ConfigError(
                "data.augment=true is not available with data=medmnist (the flip + rotation "
                "path is the CXR study's; MedMNIST v2 and the public QViT train without "
                "augmentation): use data.augment=false."
            )
        if d.mode == DistillMode.pretrain and d.pretrain_epochs >= cfg.train.max_epochs:
            raise ConfigError(
                f"distill.pretrain_epochs={d.pretrain_epochs} leaves no label fine-tuning within "
                f"train.max_epochs={cfg.train.max_epochs}; use fewer KD epochs or more epochs."
            )
        if len(m.cnn_widths) != len(m.cnn_depths) or not m.cnn_widths:
            raise ConfigError(
                "model.cnn_widths and model.cnn_depths need one entry per stage "
                f"(got {m.cnn_widths} and {m.cnn_depths})."
            )
        if d.mode != DistillMode.none and not d.teacher:
            raise ConfigError("distill.teacher is empty: name a preset (resnet18) or a run folder.")
        if m.quantum and m.circuit.device.name is not None:
            from qtl.quantum.device import check_device

            check_device(_widest(cfg), m.circuit, "model.circuit")

    def data_content(self, cfg: QtlConfig) -> dict[str, str]:
        """The ``.npz`` the run reads: its label arrays' hash and its image arrays' sizes and
        CRCs (a synthetic file is written first, as the run would)."""
        from qtl.data.content import medmnist_digests
        from qtl.utils import paths

        cache = paths.cache_dir(cfg.paths) / "content"
        return medmnist_digests(cfg.data, paths.data_dir(cfg.paths), cache)

    def run_label(self, cfg: Any) -> str:
        """``<flag>-<model>[-kd_<mode>]``."""
        distill = str(cfg.distill.mode)
        kd = "" if distill == DistillMode.none else f"-kd_{distill}"
        return f"{cfg.data.flag}-{cfg.model.name}{kd}"

    def wandb_tags(self, cfg: QtlConfig) -> list[str]:
        return [cfg.data.flag, str(cfg.model.name), f"kd_{cfg.distill.mode}", f"seed{cfg.seed}"]

    def start(self, cfg: QtlConfig) -> dict[str, Any]:
        from qtl.studies.teacher import resolve_teacher

        return {"teacher": resolve_teacher(cfg, self)}

    def inputs(self, cfg: QtlConfig, run_dir: Path, show: bool, **start: Any) -> RunInputs:
        from qtl.train.medmnist import label_names, medmnist_inputs, score_names
        from qtl.utils import paths

        teacher = start.get("teacher")
        t_data = time.perf_counter()
        got = medmnist_inputs(cfg, paths.data_dir(cfg.paths), teacher)
        names = label_names(got.info)
        return RunInputs(
            model=got.model,
            table=got.table,
            arrays=got.arrays,
            labels=got.labels,
            ids=got.ids,
            label_names=names,
            score_names=score_names(got.info, got.outputs),
            objective=got.objective,
            data_seconds=time.perf_counter() - t_data,
            record={
                "model": str(cfg.model.name),
                "dataset": cfg.data.flag,
                "task_type": got.info.task.value,
                "distill": str(cfg.distill.mode),
                "data_source": SYNTHETIC if got.synthetic is not None else REAL,
                "teacher": dict(teacher.record) if teacher is not None else {},
                "costs": got.costs,
                "quantum_noise": _noise_record(cfg),
                "train_label_counts": {
                    n: int(c) for n, c in zip(names, got.labels["train"].sum(axis=0), strict=True)
                },
            },
        )

    def predictable(self, cfg: QtlConfig) -> Predictable:
        """ViT / QViT / ResNet-18 of ``data.flag``; the image resized to ``data.size``
        square in the flag's channels, then MedMNIST's mean 0.5 / std 0.5."""
        from qtl.data.medmnist_info import flag_info
        from qtl.models.medmnist_model import build_medmnist_model
        from qtl.train.medmnist import objective, score_names
        from qtl.train.objectives import n_outputs

        info = flag_info(cfg.data.flag)
        outputs = n_outputs(info, cfg.data.binary_logits)
        shape = (int(cfg.data.size), int(cfg.data.size), info.channels)
        names = score_names(info, outputs)
        # a one-logit binary output is the positive class's probability
        described = [info.labels[-1]] if len(names) < len(info.labels) else list(info.labels)
        return Predictable(
            model=build_medmnist_model(cfg.model, shape, outputs, cfg.seed),
            objective=objective(cfg, info, 1),
            outputs=names,
            descriptions=described,
            preprocessing={
                "kind": "resize",
                "color": "gray" if info.channels == 1 else "rgb",
                "size": int(cfg.data.size),
                "model_input": "x * 2 / 255 - 1 (mean 0.5, std 0.5 on the 0..1 scale)",
                "channels": info.channels,
                "mean": [0.5] * info.channels,
                "std": [0.5] * info.channels,
            },
            task=info.task.value,
        )

    def card_facts(self, results: Results, outputs: list[str], task: str) -> CardFacts:
        cfg = results.config
        data, model = cfg.get("data", {}), cfg.get("model", {})
        what = (
            f"{results.model or model.get('name')} on MedMNIST {data.get('flag')} "
            f"({data.get('size')} px, {task})"
            + (f", distilled ({results.distill})" if results.distill != "none" else "")
        )
        circuit = model.get("circuit") if model.get("quantum") else None
        return CardFacts(what, f"MedMNIST {data.get('flag')}", circuit)

    def format_scores(self, results: Results) -> str:
        return format_medmnist_table(results)

    def describe(self, cfg: QtlConfig) -> list[tuple[str, int]]:
        """``model=vit | qvit | resnet18`` on ``data.flag``: parameters per component (from the
        built module's shapes), the per-image forward costs with classical FLOPs and quantum
        gates apart, and the QViT / parameter-matched ViT / equal-dims ViT / teacher
        comparison that the paper's "fewer parameters, fewer GFLOPs" claims are checked with."""
        from dataclasses import replace

        from qtl.data.medmnist_info import flag_info
        from qtl.models.medmnist_model import (
            abstract_medmnist_model,
            medmnist_costs,
            medmnist_parameter_table,
        )
        from qtl.models.vit_config import PROJECTIONS, vit_config
        from qtl.models.vit_costs import describe_pair, format_costs, resolve, vit_costs
        from qtl.train.medmnist import check_model
        from qtl.train.objectives import n_outputs

        info = flag_info(cfg.data.flag)
        check_model(cfg, info)
        shape = (cfg.data.size, cfg.data.size, info.channels)
        outputs = n_outputs(info, cfg.data.binary_logits)
        model = abstract_medmnist_model(cfg.model, shape, outputs)
        rows = medmnist_parameter_table(model, cfg.model)
        print(
            f"qtl model: model={cfg.model.name} data.flag={cfg.data.flag} ({info.task.value}, "
            f"{outputs} outputs) image {shape[0]}x{shape[1]}x{shape[2]}"
        )
        width = max(len(name) for name, _ in rows)
        print(f"{'component':<{width}}  {'parameters':>12}")
        for name, count in rows:
            print(f"{name:<{width}}  {count:>12,}")
        teacher_model = replace(cfg.model, name="resnet18")
        teacher = medmnist_costs(teacher_model, shape, outputs)["total"]
        if cfg.model.name == ModelName.resnet18:
            print(
                f"per image: {teacher['flops'] / 1e9:.4f} GFLOPs (XLA's count of one forward pass)"
            )
            return rows
        vit = resolve(vit_config(cfg.model), shape, outputs)
        print()
        print(
            format_costs(
                f"{cfg.model.name} per image, one forward pass", vit_costs(vit, shape, outputs)
            )
        )
        base = vit_config(cfg.model)
        quantum = list(base.quantum or base.match_params_of or PROJECTIONS)
        qvit = replace(base, name="qvit", quantum=quantum, match_params_of=None)
        matched = replace(base, name="vit", quantum=[], match_params_of=quantum)
        text, _ = describe_pair(qvit, matched, shape, outputs, teacher=teacher)
        print("\nQViT vs ViT (parameter-matched) vs teacher (ResNet-18):")
        print(text)
        return rows


def _noise_record(cfg: QtlConfig) -> dict[str, Any]:
    """The quantum layers' shots and noise for results.json; empty when exact (or classical)."""
    from qtl.quantum.noise import describe, is_active

    circuit = cfg.model.circuit
    if not cfg.model.quantum or not is_active(circuit):
        return {}
    return describe(_widest(cfg), circuit)


def _widest(cfg: QtlConfig) -> Any:
    """The widest quantum layer's circuit (what a device must hold; what the record names)."""
    from qtl.quantum.circuit import CircuitSpec

    c = cfg.model.circuit
    wires = max(cfg.model.hidden_size, cfg.model.mlp_size)
    return CircuitSpec(wires, c.layers, c.entangler, c.rotation, c.encoding)
