"""Config dataclasses of the ViT / QViT (``model=vit`` | ``model=qvit``).

Defaults are the closest public QViT design (Comajoan Cara et al.'s QuantumTransformers:
hidden 8 = qubits per circuit,
2 heads, 4 blocks, MLP 4, one variational layer, Q/K/V/O and the MLP's middle layer quantum)
with patch 4 for MedMNIST's 28 px images. The QViT paper's own sizes are not available; every
choice is a field here. The classical preset is the same config with no quantum projections
and ``match_params_of`` set, which resizes it to the QViT's parameter count for the dataset at
hand (:func:`qtl.models.vit_costs.match_parameter_count`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

from qtl.config import ConfigError, ModelConfig
from qtl.quantum.layer import QuantumLayerConfig, validate_quantum

PROJECTIONS = ("q", "k", "v", "o", "mlp")  # o: attention output; mlp: the MLP's middle layer
POOLS = ("gap", "token")


@dataclass
class ViTConfig:
    """The model layer's view of ``model=vit | qvit``: the sizes' defaults are the schema's
    (:class:`qtl.config.ModelConfig`, where each is documented); by default every projection
    is quantum (the QViT: ``conf/model/qvit.yaml``)."""

    name: str = "qvit"  # vit | qvit (a label; what is quantum is `quantum`)
    hidden_size: int = ModelConfig.hidden_size
    num_heads: int = ModelConfig.num_heads
    num_blocks: int = ModelConfig.num_blocks
    mlp_size: int = ModelConfig.mlp_size
    patch_size: int = ModelConfig.patch_size
    dropout: float = ModelConfig.dropout
    pool: str = ModelConfig.pool
    quantum: list[str] = field(default_factory=lambda: list(PROJECTIONS))  # circuits: q k v o mlp
    circuit: QuantumLayerConfig = field(default_factory=QuantumLayerConfig)
    # classical preset: shrink hidden/mlp to the parameter count of this same config with these
    # projections quantum (null: use the sizes as given, e.g. equal dims for a benchmark)
    match_params_of: list[str] | None = ModelConfig.match_params_of


def validate_vit(cfg: ViTConfig) -> None:
    """Field errors at build time (the schema may not run __post_init__)."""
    for name in ("hidden_size", "num_heads", "num_blocks", "mlp_size", "patch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"model.{name}={getattr(cfg, name)}, expected >= 1")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"model.hidden_size={cfg.hidden_size} does not divide into "
            f"model.num_heads={cfg.num_heads} heads"
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.dropout}, expected a rate in [0, 1)")
    if cfg.pool not in POOLS:
        raise ConfigError(f"model.pool='{cfg.pool}' is not one of: {', '.join(POOLS)}")
    for key, value in (("quantum", cfg.quantum), ("match_params_of", cfg.match_params_of or [])):
        bad = [p for p in value if p not in PROJECTIONS]
        if bad:
            raise ConfigError(
                f"model.{key}: {bad} not among the projections: {', '.join(PROJECTIONS)}"
            )
    if cfg.quantum:
        validate_quantum(cfg.circuit)
        if cfg.hidden_size < 2 and set(cfg.quantum) & {"q", "k", "v", "o"}:
            raise ConfigError("model.hidden_size must be >= 2 for quantum attention (qubits)")
        if cfg.mlp_size < 2 and "mlp" in cfg.quantum:
            raise ConfigError("model.mlp_size must be >= 2 for a quantum MLP layer (qubits)")


def qvit_preset() -> ViTConfig:
    """``model=qvit`` at the schema's defaults (what ``conf/model/qvit.yaml`` composes):
    quantum Q, K, V, O and MLP middle layer; the QViT benchmark's model."""
    return ViTConfig()


def equal_dims_vit(cfg: ViTConfig) -> ViTConfig:
    """The classical ViT with the QViT's dims (more parameters): the benchmark's pair."""
    return replace(cfg, name="vit", quantum=[], match_params_of=None)


def vit_config(model: ModelConfig) -> ViTConfig:
    """The ViT config of a run's ``model`` group (the schema's copy of these fields)."""
    fields_ = {f.name for f in dataclasses.fields(ViTConfig)} - {"circuit", "name"}
    kw = {name: getattr(model, name) for name in fields_}
    kw["quantum"] = list(model.quantum)
    kw["match_params_of"] = None if model.match_params_of is None else list(model.match_params_of)
    circuit = QuantumLayerConfig(
        **{f.name: getattr(model.circuit, f.name) for f in dataclasses.fields(QuantumLayerConfig)}
    )
    circuit.simulator = str(circuit.simulator)
    return ViTConfig(name=str(model.name), circuit=circuit, **kw)
