"""Typed schema for every config group.

Hydra merges the YAML files in ``conf/`` into these dataclasses, so a misspelt key or a
value outside an enum fails when the config is composed, not an hour into a run.
Checks that need more than one field (a crop larger than the resize, a label that is not
in the dataset) live in :func:`validate`.

Run identity: every dataclass that reaches a run's identity declares, for each of its fields,
whether it defines *what* the run computes (``IDENTITY``) or only *how or where* it runs
(``OPERATIONAL``: may differ between the sessions of one run without changing its results
beyond float rounding, which tests pin). Every field is in exactly one of the two
(:func:`check_identity_declarations`), so a new field is a decision, not an accident. A
nested dataclass named in ``IDENTITY`` contributes its own identity fields; one named in
``OPERATIONAL`` is left out whole. ``qtl.record.identity`` compares a rerun's identity with
the one in ``run_config.json``.

``LEGACY`` maps an identity field added after run records began to the value that
reproduces what a qtl without the field computed. A record that lacks a field (written by an
older qtl) matches a rerun whose value is that one (the schema default when not listed), and
a field at its legacy value is left out of the fingerprint, so adding a field neither orphans
a run directory nor renames a cache keyed by the fingerprint.

``FORMER_IDENTITY`` names OPERATIONAL fields that were identity in older records (the data
paths, before the data's content took their place): an older record is checked on them, and
caches keyed then are still found by them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from qtl.utils.errors import QtlUserError


class Mode(StrEnum):
    train = "train"  # train, evaluate the best checkpoint, write records
    describe = "describe"  # print the parameter table per component, no training
    bench_circuit = "bench_circuit"  # time the DQC head's value_and_grad per simulator and n
    bench_step = "bench_step"  # Table III: the train step per framework x head x task
    report = "report"  # tables, paired t-tests and figures from a sweep directory (report.sweep)
    cache = "cache"  # fill the preprocessed-image cache for the splits a run needs
    bench_data = "bench_data"  # data-path benchmark: cold, warm and augmented img/s, bytes/image
    features = "features"  # fill the frozen backbone's feature cache for the run's splits
    bench_features = "bench_features"  # head epoch times on NIH-sized features; extraction img/s
    predict = "predict"  # a finished run's (or export's) class/label probabilities for images
    export = "export"  # a finished run -> a folder loadable without qtl's training code
    robustness = "robustness"  # finished runs' test metric under a grid of shots and noise


class HeadName(StrEnum):
    cdl = "cdl"  # classical: Linear + sigmoid
    dqc = "dqc"  # dressed quantum circuit


class Simulator(StrEnum):
    pennylane = "pennylane"  # PennyLane default.qubit, jax interface, backprop (reference)
    fast = "fast"  # qtl's simulator compiled from the same tape, tested equal to pennylane


class Entangler(StrEnum):
    ring = "ring"  # CNOT 0->1, ..., (n-2)->(n-1), (n-1)->0 (the study's)
    chain = "chain"  # the ring without the wrap-around CNOT
    even_odd = "even_odd"  # CNOT on pairs (0,1), (2,3), ... then (1,2), (3,4), ...


class Rotation(StrEnum):
    ry = "ry"  # RY(theta) per wire (the study's; all gates real)
    rx = "rx"  # RX(theta) per wire (complex amplitudes)
    rz_ry = "rz_ry"  # RZ(theta_0) then RY(theta_1) per wire: two angles per wire


class ThetaInit(StrEnum):
    normal = "normal"  # N(0, (2*pi)^2), as the study's code
    uniform = "uniform"  # U[0, 2*pi), as the study's later text


class Backend(StrEnum):
    jax = "jax"  # trains, evaluates and benchmarks (the only training backend)
    torch = "torch"  # PyTorch: the same model for mode=bench_step (extra: torch)
    tf = "tf"  # TensorFlow/Keras 3: the same model for mode=bench_step (extra: tf)


class DataName(StrEnum):
    synthetic = "synthetic"
    nih_cxr_lt = "nih_cxr_lt"
    medmnist = "medmnist"  # MedMNIST 2D .npz files (data.flag, data.size): the QViT study


class ModelName(StrEnum):
    resnet_dqc = "resnet_dqc"  # the CXR study: the backbone and head groups define the model
    vit = "vit"  # classical ViT (model.quantum = [])
    qvit = "qvit"  # ViT with quantum projections (model.quantum)
    resnet18 = "resnet18"  # ResNet-18-style CNN (MedMNIST v2 baseline): the KD teacher


class DistillMode(StrEnum):
    none = "none"  # labels only
    joint = "joint"  # alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * label loss
    pretrain = "pretrain"  # pure KD for distill.pretrain_epochs, then the label loss only


class BestBy(StrEnum):
    val_loss = "val_loss"  # lowest validation loss (the CXR study's early stopping)
    val_auc = "val_auc"  # highest validation AUC (MedMNIST v2 and the public QViT)


class OnBadImage(StrEnum):
    fail = "fail"  # stop with the path and the list of every bad file found so far
    skip = "skip"  # leave them out; their ids go to the run dir and results.json


class AugmentOn(StrEnum):
    auto = "auto"  # device on a GPU/TPU, host threads on a CPU-only machine
    device = "device"  # dm-pix inside the jitted train step
    host = "host"  # OpenCV in the loader threads (fast on CPU); same draws as device


class LayerType(StrEnum):
    bottleneck = "bottleneck"
    basic = "basic"


class BatchNormMode(StrEnum):
    inference = "inference"  # running statistics always, never updated (pretrained backbone)
    batch = "batch"  # batch statistics + running-average updates in training (from scratch)


class LoggerName(StrEnum):
    none = "none"
    wandb = "wandb"


class WandbMode(StrEnum):
    auto = "auto"  # online when an API key is configured, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class TaskConfig:
    name: str = MISSING  # cxr8 | cxr14 | cxr19
    labels: list[str] = MISSING  # output column order; one sigmoid (and one qubit) per label

    IDENTITY: ClassVar[tuple[str, ...]] = ("labels",)
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("name",)  # a label: the labels define the task


class Gradient(StrEnum):
    adjoint = "adjoint"  # the simulator's exact gradient of <Z>, applied at the sampled forward
    parameter_shift = "parameter_shift"  # shifted circuits, each sampled (what hardware does)


@dataclass
class NoiseConfig:
    """``<circuit>.noise``: channels after every gate, as quantum trajectories (docs/noise.md)."""

    depolarizing: float = 0.0  # depolarizing probability after every one-qubit gate
    depolarizing_2q: float | None = None  # two-qubit, after every CNOT; null = depolarizing
    amplitude_damping: float = 0.0  # amplitude damping gamma on every wire a gate touches
    phase_damping: float = 0.0  # phase damping gamma on every wire a gate touches
    readout: float = 0.0  # measurement bit-flip probability per qubit
    device_model: str | None = None  # IBM fake backend (e.g. fake_manila): its calibration, added
    trajectories: int = 1  # quantum trajectories per example when any channel is on

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "depolarizing",
        "depolarizing_2q",
        "amplitude_damping",
        "phase_damping",
        "readout",
        "device_model",
        "trajectories",
    )
    OPERATIONAL: ClassVar[tuple[str, ...]] = ()
    # a run recorded before noise existed was noise-free
    LEGACY: ClassVar[dict[str, Any]] = {
        "depolarizing": 0.0,
        "depolarizing_2q": None,
        "amplitude_damping": 0.0,
        "phase_damping": 0.0,
        "readout": 0.0,
        "device_model": None,
        "trajectories": 1,
    }


@dataclass
class DeviceConfig:
    """``<circuit>.device``: run the circuit on a PennyLane device instead (docs/noise.md)."""

    name: str | None = None  # PennyLane device (default.mixed | lightning.qubit | qiskit.aer | ..)
    options: dict[str, Any] = field(default_factory=dict)  # qml.device kwargs; no credentials

    IDENTITY: ClassVar[tuple[str, ...]] = ("name", "options")
    OPERATIONAL: ClassVar[tuple[str, ...]] = ()
    # a run recorded before devices existed ran on qtl's own simulator
    LEGACY: ClassVar[dict[str, Any]] = {"name": None, "options": {}}


@dataclass
class HeadConfig:
    name: HeadName = MISSING
    depth: int = 3  # variational layers (dqc only)
    theta_init: ThetaInit = ThetaInit.normal  # how circuit weights start (dqc only)
    entangler: Entangler = Entangler.ring  # CNOT pattern after each rotation layer (dqc only)
    rotation: Rotation = Rotation.ry  # trainable single-qubit rotation per layer (dqc only)
    simulator: Simulator = Simulator.fast  # which simulator runs the circuit (dqc only)
    max_state_mb: float | None = None  # fast: batch chunk bound in MB; null = 8 on CPU, 2048 on GPU
    native_kernel: bool = True  # fast, CPU: C++ whole-circuit kernel (built on first use)
    shots: int | None = None  # dqc: <Z> from this many measured bitstrings; null = exact
    gradient: Gradient = Gradient.adjoint  # dqc under shots/noise: adjoint | parameter_shift
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # dqc: noise channels (trajectories)
    device: DeviceConfig = field(default_factory=DeviceConfig)  # dqc: a PennyLane device runs it

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "name",
        "depth",
        "theta_init",
        "entangler",
        "rotation",
        "simulator",
        "shots",
        "gradient",
        "noise",
        "device",
    )
    # exact expectation values: what every run computed before shots existed
    LEGACY: ClassVar[dict[str, Any]] = {"shots": None, "gradient": "adjoint"}
    # batch chunking and the native kernel: tested equal to one pass / to XLA (test_fast_sim,
    # test_native_kernel); their resolved values are recorded per session in the run record
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("max_state_mb", "native_kernel")


@dataclass
class BackboneConfig:
    name: str = MISSING  # resnet50 | resnet_small | any name for a custom shape
    layer_type: LayerType = LayerType.bottleneck  # ResNet block type (HF ResNetConfig.layer_type)
    embedding_size: int = 64  # channels of the 7x7 stem
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])  # per stage
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])  # blocks per stage
    pretrained: str | None = None  # HF hub id | local dir with model.safetensors | synthetic | null
    pretrain_epochs: int = 15  # pretrained=synthetic: epochs on the synthetic source set
    pretrain_lr: float = 1e-3  # pretrained=synthetic: Adam rate of that pretraining
    freeze: bool = False  # true: train the head only (the study fine-tunes everything)
    batch_norm: BatchNormMode = BatchNormMode.inference  # inference: frozen running stats
    conv1x1_as_matmul: bool = True  # 1x1 convs as einsum: same result, ~2x faster CPU backward

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "layer_type",
        "embedding_size",
        "hidden_sizes",
        "depths",
        "pretrained",
        "pretrain_epochs",
        "pretrain_lr",
        "freeze",
        "batch_norm",
    )
    # name: a label (the shape fields define the network); conv1x1_as_matmul: the same
    # kernels and outputs either way (test_resnet), checkpoints do not depend on it
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("name", "conv1x1_as_matmul")


@dataclass
class DataConfig:
    name: DataName = MISSING
    root: str | None = None  # NIH: label CSVs' folder; synthetic, medmnist: null = paths.data_dir/.
    image_dir: str | None = None  # NIH image folder; null = <root>/images
    external_csv: str | None = None  # MIMIC-CXR-LT test label CSV; null = no external test
    external_root: str | None = None  # MIMIC-CXR-JPG root the CSV's `path` column is relative to
    resize: int = 256  # shortest side after resize
    crop: int = 224  # centre crop (train and test)
    augment: bool = True  # random flip + rotation on training batches
    hflip_p: float = 0.5  # probability of a horizontal flip
    max_rotation_deg: float = 15.0  # rotation drawn uniformly in [-x, x] degrees
    workers: int = 0  # threads decoding images; 0 = one per CPU core
    cache_dir: str = ".cache/qtl/images"  # image cache; conf/data sets it to paths.image_cache
    on_bad_image: OnBadImage = OnBadImage.fail  # corrupt/missing image: fail | skip
    augment_on: AugmentOn = AugmentOn.auto  # where flip + rotation run: auto | device | host
    limit: int | None = None  # use only the first N records per split (smoke tests)
    # synthetic generator (ignored for real data)
    synth_seed: int = 0  # the dataset's own seed (independent of the training seed)
    synth_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 3000, "val": 600, "test": 1000, "external": 800}
    )  # images per split
    synth_image_px: int = 256  # side of the square PNGs written (NIH's are 1024)
    synth_difficulty: float = 1.0  # >1 = fainter traces and more noise
    # data=medmnist (ignored by the CXR data)
    flag: str = "retinamnist"  # one of the 12 MedMNIST 2D sets (qtl.data.medmnist_info.FLAGS)
    size: int = 28  # 28 ({flag}.npz) | 64 | 128 | 224 ({flag}_{size}.npz)
    synthetic: bool = False  # synthetic stand-in data (medmnist: written to data.root if missing)
    synth_noise: float = 0.08  # synthetic MedMNIST pixel noise (0..1 scale)
    check_split_sizes: bool | None = None  # null: official split sizes required of real files
    binary_logits: int = 1  # binary sets: 1 (sigmoid BCE) | 2 (softmax CE, MedMNIST v2 style)

    # augment_on enters the identity resolved (auto -> host or device for this machine), and
    # a resume keeps the placement recorded at the first start: host and device augmentation
    # agree only to rounding and at the border (qtl.data.augment)
    IDENTITY: ClassVar[tuple[str, ...]] = (
        "name",
        "resize",
        "crop",
        "augment",
        "hflip_p",
        "max_rotation_deg",
        "on_bad_image",
        "augment_on",
        "limit",
        "synth_seed",
        "synth_sizes",
        "synth_image_px",
        "synth_difficulty",
        "flag",
        "size",
        "synthetic",
        "synth_noise",
        "check_split_sizes",
        "binary_logits",
    )
    # where the data lies, not what it is: a run's identity names its data by content
    # (qtl.data.content: label files' hashes, the image set's manifest), so it may move
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "workers",
        "cache_dir",
        "root",
        "image_dir",
        "external_csv",
        "external_root",
    )
    # identity fields of record versions <= 3 (and of the caches keyed then): a record that
    # names its data by these paths is checked on them until it records the data's content
    FORMER_IDENTITY: ClassVar[tuple[str, ...]] = (
        "root",
        "image_dir",
        "external_csv",
        "external_root",
    )
    # the MedMNIST fields: what a CXR run computed before they existed (they do not apply)
    LEGACY: ClassVar[dict[str, Any]] = {
        "flag": "retinamnist",
        "size": 28,
        "synthetic": True,
        "synth_noise": 0.08,
        "check_split_sizes": None,
        "binary_logits": 1,
    }


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4  # learning rate
    backbone_lr: float | None = None  # backbone's own rate when fine-tuning; null = lr
    weight_decay: float = 0.0  # adamw only
    batch_size: int = 32  # training batch (last partial batch is padded + masked, not dropped)
    eval_batch_size: int = 64  # batch for validation / test passes
    max_epochs: int = 50  # hard cap on epochs
    patience: int = 5  # stop after this many epochs without a lower val loss
    min_delta: float = 0.0  # improvement smaller than this does not reset patience
    log_every: int = 10  # W&B train-loss logging period in steps
    best_by: BestBy = BestBy.val_loss  # best epoch and patience: val_loss | val_auc
    devices: Any = 1  # data-parallel devices of this process: an int or "all" (qtl.utils.mesh)
    wait_for_lock: bool = False  # run dir in use by a live process: wait (true) or exit 2
    processes: int = 1  # processes of one run (each runs this command; qtl.utils.distributed)
    coordinator: str | None = None  # process 0's host:port; null = QTL_COORDINATOR or SLURM's env
    process_id: int | None = None  # this process's index; null = QTL_PROCESS_ID or SLURM_PROCID
    coordinator_timeout_s: int = 300  # wait this long for every process to join, then exit 2

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "optimizer",
        "lr",
        "backbone_lr",
        "weight_decay",
        "batch_size",
        "max_epochs",
        "patience",
        "min_delta",
        "best_by",
    )
    LEGACY: ClassVar[dict[str, Any]] = {"best_by": "val_loss"}
    # eval batches are per-row computations (eval-mode batch norm): the batch size only
    # changes how many rows share one call
    # devices: the same global batch on more devices is the same program (tests/test_devices.py)
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "eval_batch_size",
        "log_every",
        "devices",
        "wait_for_lock",
        "processes",
        "coordinator",
        "process_id",
        "coordinator_timeout_s",
    )


@dataclass
class CircuitConfig:
    """The circuit of every quantum projection of a QViT (qtl.quantum.layer)."""

    layers: int = 1  # L variational layers (rotation on every wire, then the CNOT ring)
    encoding: str = "rx"  # rx (public design: raw features as RX angles) | ry | h_ry
    rotation: str = "rx"  # rx (public design) | ry | rz_ry
    entangler: str = "qvit_ring"  # qvit_ring (j -> j+1 mod d) | ring | chain | even_odd
    init: str = "xavier_normal"  # xavier_normal (public design) | normal_2pi | uniform_2pi
    simulator: Simulator = Simulator.fast  # fast (qtl's) | pennylane (reference)
    max_state_mb: float | None = None  # fast: chunk bound of the state vectors; null = auto
    native_kernel: bool = True  # fast, CPU: the C++ kernels (real and complex circuits)
    shots: int | None = None  # <Z> from this many measured bitstrings; null = exact
    gradient: Gradient = Gradient.adjoint  # under shots/noise: adjoint | parameter_shift
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # noise channels (trajectories)
    device: DeviceConfig = field(default_factory=DeviceConfig)  # a PennyLane device runs it

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "layers",
        "encoding",
        "rotation",
        "entangler",
        "init",
        "shots",
        "gradient",
        "noise",
        "device",
    )
    # tested equal (test_vit: fast vs PennyLane, chunking, kernel): how, not what
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("simulator", "max_state_mb", "native_kernel")
    LEGACY: ClassVar[dict[str, Any]] = {
        "layers": 1,
        "encoding": "rx",
        "rotation": "rx",
        "entangler": "qvit_ring",
        "init": "xavier_normal",
        "shots": None,
        "gradient": "adjoint",
    }


@dataclass
class ModelConfig:
    """``model=``: resnet_dqc (the CXR study: backbone + head groups) | vit | qvit | resnet18.

    The ViT fields are qtl.models.vit_config.ViTConfig's; resnet18 uses the cnn_* fields.
    """

    name: ModelName = ModelName.resnet_dqc
    hidden_size: int = 8  # ViT token width = qubits of every attention circuit
    num_heads: int = 2  # attention heads (hidden_size must divide by it)
    num_blocks: int = 4  # pre-LayerNorm transformer blocks
    mlp_size: int = 4  # MLP hidden width (= qubits of the quantum MLP layer)
    patch_size: int = 4  # conv patch embedding, kernel = stride = patch
    dropout: float = 0.1  # attention weights, sublayer outputs, MLP, embeddings
    pool: str = "gap"  # gap (mean over tokens, public design) | token (a learned class token)
    quantum: list[str] = field(default_factory=list)  # circuits among q k v o mlp; [] = classical
    match_params_of: list[str] | None = None  # classical: resize to this quantum set's count
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    cnn_stem: int = 64  # resnet18: channels of the 3x3 stride-1 stem (MedMNIST v2 at 28 px)
    cnn_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # per stage
    cnn_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # basic blocks per stage

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "name",
        "hidden_size",
        "num_heads",
        "num_blocks",
        "mlp_size",
        "patch_size",
        "dropout",
        "pool",
        "quantum",
        "match_params_of",
        "circuit",
        "cnn_stem",
        "cnn_widths",
        "cnn_depths",
    )
    OPERATIONAL: ClassVar[tuple[str, ...]] = ()
    # a CXR run (resnet_dqc) computed exactly this before the group existed
    LEGACY: ClassVar[dict[str, Any]] = {
        "name": "resnet_dqc",
        "hidden_size": 8,
        "num_heads": 2,
        "num_blocks": 4,
        "mlp_size": 4,
        "patch_size": 4,
        "dropout": 0.1,
        "pool": "gap",
        "quantum": [],
        "match_params_of": None,
        "cnn_stem": 64,
        "cnn_widths": [64, 128, 256, 512],
        "cnn_depths": [2, 2, 2, 2],
    }


@dataclass
class DistillConfig:
    """``distill=none | joint | pretrain``: knowledge distillation from a trained teacher."""

    mode: DistillMode = DistillMode.none
    temperature: float = 4.0  # T: student and teacher logits divided by T
    alpha: float = 0.7  # joint: weight of the T^2-scaled KD term; 1 - alpha on the label loss
    pretrain_epochs: int = 10  # pretrain: epochs of pure KD before the label loss takes over
    teacher: str = "resnet18"  # a model preset qtl trains on the same data, or a run directory
    teacher_seed: int = 0  # seed of a preset teacher (one teacher per dataset, every student)
    teacher_epochs: int | None = None  # a preset teacher's train.max_epochs; null = the student's

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "mode",
        "temperature",
        "alpha",
        "pretrain_epochs",
        "teacher",
        "teacher_seed",
        "teacher_epochs",
    )
    OPERATIONAL: ClassVar[tuple[str, ...]] = ()
    LEGACY: ClassVar[dict[str, Any]] = {
        "teacher_epochs": None,
        "mode": "none",
        "temperature": 4.0,
        "alpha": 0.7,
        "pretrain_epochs": 10,
        "teacher": "resnet18",
        "teacher_seed": 0,
    }


@dataclass
class WandbConfig:
    project: str = "qtl"  # W&B project
    entity: str | None = None  # W&B entity (team/user); null = default
    mode: WandbMode = WandbMode.auto  # online | offline | auto (offline without an API key)
    tags: list[str] = field(default_factory=list)  # extra tags (task/head/seed are added)


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class BackendConfig:
    name: Backend = Backend.jax  # jax runs every mode; torch | tf only mode=bench_step (Table III)

    IDENTITY: ClassVar[tuple[str, ...]] = ("name",)
    OPERATIONAL: ClassVar[tuple[str, ...]] = ()


class ReportFigure(StrEnum):
    mean_auroc = "mean_auroc"  # mean AUROC bars per task/head with significance brackets
    per_label = "per_label"  # per-label AUROC bars per task/test set, by training frequency
    volcano = "volcano"  # -log10 p against signed log2 % diff, per label group
    loss_curves = "loss_curves"  # train/val loss per epoch, mean +- sd band per head


@dataclass
class ReportConfig:
    sweep: str | None = None  # multirun folder to report on (mode=report); e.g. multirun/demo
    out: str | None = None  # where report.md, tables/, figures/ go; null = <sweep>/report
    alpha: float = 0.05  # significance level: '*' and the volcano's p line
    figures: list[ReportFigure] = field(default_factory=lambda: list(ReportFigure))  # to draw
    dpi: int = 100  # PNG resolution
    auto: bool = True  # write the report when a multirun (launch.py -m) ends


class SearchObjective(StrEnum):
    val_loss = "val_loss"  # best validation loss (the early-stopping criterion): minimised
    val_auroc = "val_auroc"  # validation mean AUROC of that best checkpoint: maximised


@dataclass
class SearchConfig:
    objective: SearchObjective = SearchObjective.val_loss  # what a trial returns to Optuna

    @property
    def direction(self) -> str:
        """Optuna's direction for the objective: never set by hand, so it cannot disagree."""
        return "minimize" if self.objective == SearchObjective.val_loss else "maximize"


@dataclass
class BenchCircuitConfig:
    qubits: list[int] = field(default_factory=lambda: [8, 14, 19])  # circuit sizes to time
    batch: int = 32  # images per step (the study's batch)
    features: int = 2048  # head input width (ResNet-50's pooled features)
    simulators: list[str] = field(
        default_factory=lambda: ["fast", "pennylane", "tensorcircuit", "lightning"]
    )  # fast | pennylane | tensorcircuit | lightning | qulacs (bench extra); missing: a note
    steps: int = 30  # timed steps per case, after warm-up
    warmup: int = 2  # untimed steps after compilation
    max_seconds: float = 600.0  # per-case budget: fewer timed steps (>= 3) when a case is slow
    rounds: int = 2  # every case again in a fresh process per round: the table shows the spread
    out: str = "${paths.bench_dir}/circuit.json"  # JSON results
    jemalloc: bool = False  # preload libjemalloc in workers (measured slower here: see README)
    # extra fast cases (docs/noise.md): shots = forward with head.shots=noise_shots beside the
    # exact forward; trajectories = the step with noise_trajectories depolarizing trajectories
    noise_cases: list[str] = field(default_factory=list)  # [] | shots | trajectories
    noise_shots: int = 1000  # shots of the shots case
    noise_trajectories: int = 8  # K of the trajectories case (depolarizing noise_depolarizing)
    noise_depolarizing: float = 0.001  # its one- and two-qubit depolarizing probability


@dataclass
class BenchStepConfig:
    backends: list[Backend] | None = None  # frameworks to time; null = the backend group's one
    tasks: list[str] | None = None  # cxr8 | cxr14 | cxr19 (one qubit per label); null = task
    heads: list[HeadName] = field(default_factory=lambda: [HeadName.cdl, HeadName.dqc])  # to time
    jax_simulators: list[Simulator] = field(
        default_factory=lambda: [Simulator.pennylane, Simulator.fast]
    )  # JAX DQC columns: PennyLane in the jitted step (the study's route) and qtl's fast one
    torch_compile: list[bool] = field(default_factory=lambda: [False, True])  # eager, compiled
    tf_jit_compile: bool = True  # TF step under tf.function(jit_compile=True) (XLA)
    head_only: bool = False  # time the head alone on (batch, backbone width) zero features
    image_px: int | None = None  # input side in pixels; null = data.crop
    batch: int = 32  # images per step (the study's protocol: zero images and zero labels)
    steps: int = 30  # timed steps per case, after warm-up
    warmup: int = 10  # untimed steps after the first (compiling) one
    max_seconds: float = 600.0  # per-case budget: fewer warm-up (<= 1/3 of it) and timed (>= 3)
    case_timeout_s: float = 1800.0  # a case still running then is killed and recorded
    max_rss_gb: float = 16.0  # a case whose processes exceed this RSS is killed: out of memory
    out: str = "${paths.bench_dir}/step.json"  # JSON results, the Markdown table beside (.md)
    dry_run: bool = False  # list the cases (after every check) and exit without running them


class FeatureDtype(StrEnum):
    float16 = "float16"  # half the disk and memory; predictions within ~1e-3 (docs/bench)
    float32 = "float32"  # the backbone's own output, bit for bit


@dataclass
class FeaturesConfig:
    """Frozen-backbone feature cache (qtl.data.features): the backbone runs once per image."""

    cache: bool = False  # true: train the head on cached pooled features (needs backbone.freeze)
    dtype: FeatureDtype = FeatureDtype.float16  # stored precision of the features
    chunk: int = 2048  # feature vectors per chunk file: a killed extraction loses at most one
    batch_size: int = 64  # images per backbone call while extracting
    level: int = 3  # zstd level of the chunk files (lossless); 0 = stored uncompressed

    IDENTITY: ClassVar[tuple[str, ...]] = ("cache", "dtype")
    # a run without the cache computed as cache=false, whatever dtype says
    LEGACY: ClassVar[dict[str, Any]] = {"cache": False, "dtype": "float16"}
    # chunking, extraction batch and compression: the same stored values either way
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("chunk", "batch_size", "level")


@dataclass
class BenchFeaturesConfig:
    sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 78605, "val": 12535, "test": 21081}
    )  # synthetic feature vectors per split (NIH-CXR-LT's split sizes)
    width: int = 2048  # feature width (ResNet-50's pooled features)
    labels: int = 19  # one output (and one qubit) per label: CXR-19
    batch: int = 32  # training batch
    dqc_seconds: float = 120.0  # DQC: time this long of its epoch, then extrapolate
    dqc_qubits: list[int] = field(default_factory=lambda: [19])  # DQC sizes timed (8, 14, 19)
    extract_images: int = 256  # ResNet-50 images timed for the extraction rate (after warm-up)
    extract_px: int = 224  # their side
    out: str = "${paths.bench_dir}/features.json"  # JSON results


@dataclass
class BenchDataConfig:
    images: int = 2000  # synthetic images in the benchmark set (written once, reused)
    image_px: int = 1024  # their side in pixels (NIH's are 1024)
    cold_images: int = 300  # images timed on the cold path per thread count (3 passes, best)
    warm_epochs: int = 3  # shuffled passes timed on the warm and augmented paths (best)
    batch_size: int = 32  # images per batch on the warm and augmented paths


@dataclass
class PredictConfig:
    """``mode=predict``: probabilities of a trained model for a folder or list of images."""

    run_dir: str | None = None  # a finished run folder (its best checkpoint) or an export folder
    images: str | None = None  # a folder (PNG/JPEG/DICOM, recursive) or a CSV with a path column
    out: str | None = None  # the CSV written; null = predictions.csv in this mode's own folder
    batch_size: int = 32  # images per forward pass


@dataclass
class ExportConfig:
    """``mode=export``: a finished run as weights (safetensors), config, labels,
    preprocessing, metrics, provenance and a model card, loadable by qtl.export.load."""

    run_dir: str | None = None  # the finished run folder to export
    out: str | None = None  # the export folder (new or empty); null = model/ in this mode's folder


@dataclass
class RobustnessConfig:
    """``mode=robustness``: finished runs re-evaluated on a split under shots and noise."""

    runs: str | None = None  # a finished run folder, or a folder searched for them (a sweep)
    shots: list[Any] = field(default_factory=lambda: [100, 1000, 10000, None])  # null = exact
    depolarizing: list[float] = field(default_factory=lambda: [0.0, 0.001, 0.01])  # per gate
    device_models: list[str] = field(default_factory=list)  # IBM fake backends (noise extra)
    trajectories: int = 8  # quantum trajectories per example when a gate channel is on
    device: DeviceConfig = field(default_factory=DeviceConfig)  # every point on this PL device
    split: str = "test"  # the split evaluated
    out: str | None = None  # folder of robustness.csv/.md/.png; null = this mode's own folder


@dataclass
class PathsConfig:
    """Every root qtl reads or writes (conf/paths/default.yaml derives them from ``root``)."""

    root: str = "."  # base of the defaults below
    cache_dir: str = ".cache/qtl"  # caches shared by every run and seed
    data_dir: str = ".cache/qtl"  # where built-in synthetic datasets are written
    image_cache: str = ".cache/qtl/images"  # preprocessed-image cache
    feature_cache: str = ".cache/qtl/features"  # frozen-backbone feature cache
    pretrained_dir: str = ".cache/qtl/pretrained"  # backbones pretrained by qtl itself
    kernel_dir: str = "~/.cache/qtl/kernels"  # compiled native CPU kernels
    jax_cache: str = ".cache/jax"  # XLA compilation cache
    output_dir: str = "outputs"  # single runs; other modes under <output_dir>/_<mode>/
    sweep_dir: str = "multirun"  # multiruns
    bench_dir: str = "bench"  # benchmark JSON


@dataclass
class QtlConfig:
    mode: Mode = Mode.train
    study: str | None = None  # cxr | medmnist | a registered study; null = data.name's study
    name: str = "default"  # experiment name: groups run directories under outputs/<name>
    seed: int = 0  # one seed drives init, batch order and augmentation
    task: TaskConfig = MISSING
    head: HeadConfig = MISSING
    backbone: BackboneConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)  # resnet_dqc | vit | qvit | resnet18
    distill: DistillConfig = field(default_factory=DistillConfig)  # knowledge distillation
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    progress: bool | None = None  # progress bars; null = only when stderr is a terminal
    paths: PathsConfig = field(default_factory=PathsConfig)  # every cache and output root
    # a benchmark's settings exist in its own mode only (conf/mode/<mode>.yaml sets the section,
    # these dataclasses hold its defaults): a training run's config does not carry them
    bench_circuit: BenchCircuitConfig | None = None  # mode=bench_circuit
    bench_data: BenchDataConfig | None = None  # mode=bench_data
    bench_step: BenchStepConfig | None = None  # mode=bench_step
    search: SearchConfig = field(default_factory=SearchConfig)  # experiment=search: objective
    features: FeaturesConfig = field(default_factory=FeaturesConfig)  # frozen-backbone cache
    bench_features: BenchFeaturesConfig | None = None  # mode=bench_features
    predict: PredictConfig | None = None  # mode=predict (conf/mode/predict.yaml)
    export: ExportConfig | None = None  # mode=export (conf/mode/export.yaml)
    robustness: RobustnessConfig | None = None  # mode=robustness (conf/mode/robustness.yaml)

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "study",
        "seed",
        "task",
        "head",
        "backbone",
        "data",
        "model",
        "distill",
        "train",
        "backend",
        "features",
    )
    # name: the experiment's label (it names the run directory, it computes nothing)
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "mode",
        "name",
        "logger",
        "report",
        "progress",
        "bench_circuit",
        "bench_data",
        "bench_step",
        "paths",  # where caches and outputs live, not what a run computes
        "search",  # how a search scores a run, not what the run computes
        "bench_features",
        "predict",  # the other modes' own settings: no run computes with them
        "export",
        "robustness",
    )
    # null: the study data.name selects, which is what a qtl without the field ran
    LEGACY: ClassVar[dict[str, Any]] = {"study": None}


def check_identity_declarations(cls: type = QtlConfig) -> None:
    """Every field of every dataclass in the identity is declared IDENTITY xor OPERATIONAL."""
    from dataclasses import fields, is_dataclass
    from typing import get_type_hints

    names = {f.name for f in fields(cls)}
    identity = set(getattr(cls, "IDENTITY", ()))
    operational = set(getattr(cls, "OPERATIONAL", ()))
    problems = []
    if undeclared := names - identity - operational:
        problems.append(f"not declared IDENTITY or OPERATIONAL: {sorted(undeclared)}")
    if both := identity & operational:
        problems.append(f"declared both IDENTITY and OPERATIONAL: {sorted(both)}")
    if unknown := (identity | operational | set(getattr(cls, "LEGACY", {}))) - names:
        problems.append(f"declared but not fields: {sorted(unknown)}")
    if stray := set(getattr(cls, "LEGACY", {})) - identity:
        problems.append(f"LEGACY fields that are not IDENTITY fields: {sorted(stray)}")
    if stray := set(getattr(cls, "FORMER_IDENTITY", ())) - operational:
        problems.append(f"FORMER_IDENTITY fields that are not OPERATIONAL: {sorted(stray)}")
    if problems:
        raise TypeError(f"qtl.config.{cls.__name__}: " + "; ".join(problems))
    hints = get_type_hints(cls)
    for name in sorted(identity):
        if isinstance(hints[name], type) and is_dataclass(hints[name]):
            check_identity_declarations(hints[name])


# the run's folder under its experiment (``<run label>/seed<n>``): the study's, given to
# :func:`register_configs` by ``qtl.studies`` (the layer that knows the studies)
_run_subdir: Callable[[Any], str] | None = None


@functools.cache
def _process_stamp() -> str:
    """One time stamp per process: every resolution of hydra.run.dir gives the same folder."""
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")


def _run_dir(*, _root_: Any) -> str:
    """``hydra.run.dir``: a training run's own folder; any other mode gets a folder of its own
    (``<output_dir>/_<mode>/<time>``), so a benchmark or a report never writes into a run."""
    if str(_root_.mode) == Mode.train:
        assert _run_subdir is not None, "register the configs through qtl.studies"
        return f"{_root_.paths.output_dir}/{_root_.name}/{_run_subdir(_root_)}"
    return f"{_root_.paths.output_dir}/_{_root_.mode}/{_process_stamp()}"


def _sweep_subdir(*, _root_: Any) -> str:
    """``hydra.sweep.subdir``: the run's folder in a multirun (other modes: ``_<mode>/<job>``)."""
    if str(_root_.mode) == Mode.train:
        assert _run_subdir is not None, "register the configs through qtl.studies"
        return _run_subdir(_root_)
    return f"_{_root_.mode}/{_root_.hydra.job.num}"


def register_configs(run_subdir: Callable[[Any], str]) -> None:
    """Register the schema so ``conf/config.yaml`` can extend it, and the run-dir resolvers
    (``run_subdir``: a training run's folder under its experiment, the study's)."""
    global _run_subdir
    _run_subdir = run_subdir
    check_identity_declarations()  # a field added without saying whether it is identity
    cs = ConfigStore.instance()
    cs.store(name="qtl_schema", node=QtlConfig)
    OmegaConf.register_new_resolver("qtl_run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("qtl_sweep_subdir", _sweep_subdir, replace=True)


class ConfigError(QtlUserError, ValueError):
    """A config value that cannot work; the message says which field and what to use."""


def to_schema(cfg: DictConfig | QtlConfig) -> QtlConfig:
    """Typed view (real dataclasses and enums) of a composed config."""
    if isinstance(cfg, QtlConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QtlConfig), cfg))  # type: ignore[return-value]


def validate(cfg: QtlConfig) -> None:
    """Cross-field checks with messages a researcher can act on."""
    from qtl.labels import ALL_LABELS

    unknown = [label for label in cfg.task.labels if label not in ALL_LABELS]
    if unknown:
        raise ConfigError(
            f"task.labels: unknown label(s) {unknown} in task '{cfg.task.name}'. "
            f"Valid NIH-CXR-LT labels: {', '.join(ALL_LABELS)}."
        )
    if len(set(cfg.task.labels)) != len(cfg.task.labels):
        raise ConfigError(f"task.labels: duplicate labels in task '{cfg.task.name}'.")
    if cfg.data.crop > cfg.data.resize:
        raise ConfigError(
            f"data.crop={cfg.data.crop} is larger than data.resize={cfg.data.resize}; "
            "the centre crop must fit inside the resized image."
        )
    checks: list[tuple[str, Any, bool]] = [
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size > 0),
        ("train.eval_batch_size", cfg.train.eval_batch_size, cfg.train.eval_batch_size > 0),
        ("train.max_epochs", cfg.train.max_epochs, cfg.train.max_epochs > 0),
        ("train.patience", cfg.train.patience, cfg.train.patience > 0),
        ("train.lr", cfg.train.lr, cfg.train.lr > 0),
        ("train.backbone_lr", cfg.train.backbone_lr, (cfg.train.backbone_lr or 1.0) > 0),
        ("head.depth", cfg.head.depth, cfg.head.depth > 0),
        ("head.max_state_mb", cfg.head.max_state_mb, (cfg.head.max_state_mb or 1.0) > 0),
        ("train.weight_decay", cfg.train.weight_decay, cfg.train.weight_decay >= 0),
        ("train.min_delta", cfg.train.min_delta, cfg.train.min_delta >= 0),
        ("train.log_every", cfg.train.log_every, cfg.train.log_every > 0),
        ("data.hflip_p", cfg.data.hflip_p, 0.0 <= cfg.data.hflip_p <= 1.0),
        ("data.max_rotation_deg", cfg.data.max_rotation_deg, 0 <= cfg.data.max_rotation_deg <= 180),
        ("data.workers", cfg.data.workers, cfg.data.workers >= 0),
        ("data.crop", cfg.data.crop, cfg.data.crop >= 16),
    ]
    if (bd := cfg.bench_data) is not None:
        checks += [
            ("bench_data.images", bd.images, bd.images > 0),
            ("bench_data.batch_size", bd.batch_size, bd.batch_size > 0),
            ("bench_data.warm_epochs", bd.warm_epochs, bd.warm_epochs > 0),
        ]
    for key, value, ok in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is out of range.")
    devices = cfg.train.devices
    if not (
        str(devices).lower() == "all"
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices > 0)
    ):
        raise ConfigError(f"train.devices={devices!r}: expected a positive integer or 'all'.")
    if cfg.train.processes < 1 or cfg.train.coordinator_timeout_s < 1:
        raise ConfigError(
            f"train.processes={cfg.train.processes}, train.coordinator_timeout_s="
            f"{cfg.train.coordinator_timeout_s}: expected positive integers."
        )
    if cfg.train.optimizer not in ("adam", "adamw", "sgd"):
        raise ConfigError(
            f"train.optimizer='{cfg.train.optimizer}' is not supported; use adam, adamw or sgd."
        )
    if len(cfg.backbone.hidden_sizes) != len(cfg.backbone.depths):
        raise ConfigError(
            "backbone.hidden_sizes and backbone.depths must have one entry per stage "
            f"(got {len(cfg.backbone.hidden_sizes)} and {len(cfg.backbone.depths)})."
        )
    validate_features(cfg)
    validate_circuit_options(cfg.head, "head")
    validate_circuit_options(cfg.model.circuit, "model.circuit")
    if cfg.data.name == DataName.nih_cxr_lt and not cfg.data.root:
        raise ConfigError(
            "data.root is not set: data=nih_cxr_lt needs data.root=<folder with "
            "miccai2023_nih-cxr-lt_labels_{train,val,test}.csv>. "
            "Use data=synthetic to try qtl without data."
        )
    # the run's study checks its own fields (qtl.studies: Study.validate)


def validate_features(cfg: QtlConfig, *, needed: bool = False) -> None:
    """``features.*``: a cache of fixed features needs a backbone that is fixed and images
    that are (no augmentation). ``needed``: the mode fills the cache (mode=features)."""
    fc = cfg.features
    for key, value, ok in [
        ("features.chunk", fc.chunk, fc.chunk > 0),
        ("features.batch_size", fc.batch_size, fc.batch_size > 0),
        ("features.level", fc.level, 0 <= fc.level <= 22),
    ]:
        if not ok:
            raise ConfigError(f"{key}={value} is out of range.")
    if not (fc.cache or needed):
        return
    why = "features.cache=true" if fc.cache else f"mode={cfg.mode}"
    if not cfg.backbone.freeze:
        raise ConfigError(
            f"{why} needs backbone.freeze=true: the features of a backbone that trains change "
            "every step and cannot be cached. Set backbone.freeze=true (experiment=frozen sets "
            "it), or features.cache=false to fine-tune on images."
        )
    if cfg.backbone.batch_norm != BatchNormMode.inference:
        raise ConfigError(
            f"{why} needs backbone.batch_norm=inference: with batch statistics an image's "
            f"features depend on the rest of its batch (got {cfg.backbone.batch_norm})."
        )
    if cfg.data.augment:
        raise ConfigError(
            f"{why} needs data.augment=false: augmentation cannot be cached (each epoch would "
            "need the features of freshly flipped and rotated images). Set data.augment=false "
            "(experiment=frozen does), or features.cache=false to train on augmented images."
        )


def validate_circuit_options(opts: Any, where: str) -> None:
    """Shots, gradient and noise of a circuit (``head`` or ``model.circuit``), before training."""
    if opts.shots is not None and (isinstance(opts.shots, bool) or opts.shots <= 0):
        raise ConfigError(f"{where}.shots={opts.shots}: expected a positive integer or null.")
    noise = opts.noise
    channels = ("depolarizing", "depolarizing_2q", "amplitude_damping", "phase_damping", "readout")
    for name in channels:
        value = getattr(noise, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}.noise.{name}={value}: expected a probability in [0, 1].")
    if noise.trajectories < 1:
        raise ConfigError(f"{where}.noise.trajectories={noise.trajectories}: expected >= 1.")
    # noise.device_model names a calibration snapshot: qtl.studies checks it (it needs qiskit)
