"""The model of a MedMNIST run (``model=vit | qvit | resnet18``), its parameter table and its
per-image costs, from the run's ``model`` group and the dataset's image shape."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from qtl.config import ModelConfig, ModelName


def build_medmnist_model(
    cfg: ModelConfig, image_shape: tuple[int, int, int], n_outputs: int, seed: int
) -> nnx.Module:
    """Seeded model: a ViT/QViT (``match_params_of`` resolved for this dataset) or the CNN."""
    if cfg.name == ModelName.resnet18:
        from qtl.models.cnn import MedCNN

        key = jax.random.key(seed)
        return MedCNN(
            cfg, image_shape[2], n_outputs, rngs=nnx.Rngs(params=jax.random.fold_in(key, 1))
        )
    from qtl.models.vit import build_vit
    from qtl.models.vit_config import vit_config

    return build_vit(vit_config(cfg), image_shape, n_outputs, seed)


def abstract_medmnist_model(
    cfg: ModelConfig, image_shape: tuple[int, int, int], n_outputs: int
) -> nnx.Module:
    """Structure and shapes without allocating weights (``mode=describe``)."""
    return nnx.eval_shape(lambda: build_medmnist_model(cfg, image_shape, n_outputs, 0))


def medmnist_parameter_table(model: nnx.Module, cfg: ModelConfig) -> list[tuple[str, int]]:
    """Parameters per component, as the built module holds them, with the total last."""
    if cfg.name == ModelName.resnet18:
        from qtl.models.cnn import cnn_parameter_table

        return cnn_parameter_table(model)  # type: ignore[arg-type]
    from qtl.models.vit_costs import module_parameter_table

    rows = list(module_parameter_table(model).items())
    return [*rows, ("total", sum(n for _, n in rows))]


def medmnist_costs(
    cfg: ModelConfig, image_shape: tuple[int, int, int], n_outputs: int
) -> dict[str, Any]:
    """Per-image forward costs: the ViT's analytic table (classical FLOPs, quantum gates
    apart) or, for the CNN, XLA's FLOP count of one image."""
    if cfg.name == ModelName.resnet18:
        import jax.numpy as jnp

        from qtl.models.vit_costs import xla_flops

        model = build_medmnist_model(cfg, image_shape, n_outputs, 0)
        model.eval()
        table = dict(medmnist_parameter_table(model, cfg))
        flops = xla_flops(lambda x: model(x), jnp.zeros((1, *image_shape), jnp.float32))
        return {"total": {"params": table["total"], "flops": flops or 0}}
    from qtl.models.vit_config import vit_config
    from qtl.models.vit_costs import resolve, vit_costs

    vit = resolve(vit_config(cfg), image_shape, n_outputs)
    out = vit_costs(vit, image_shape, n_outputs).as_dict()
    out["resolved"] = {"hidden_size": vit.hidden_size, "mlp_size": vit.mlp_size}
    return out
