"""Load Hugging Face ``microsoft/resnet-50``-style weights into :class:`qtl.models.resnet.ResNet`.

The hub checkpoint is a PyTorch safetensors file with transformers' ``ResNetModel`` key names
(prefixed with ``resnet.`` in ``ResNetForImageClassification``). It is read with
``safetensors.numpy``, so importing weights needs neither torch nor transformers. Conv kernels
are transposed from PyTorch's OIHW to HWIO. The import is strict: every model variable must be
filled and every checkpoint tensor used, otherwise a :class:`ConfigError` says which key, which
shapes, and which ``backbone.*`` settings would make them agree.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtl.config import ConfigError
from qtl.models.resnet import ResNet

_WEIGHTS_NAME = "model.safetensors"
_INDEX_NAME = "model.safetensors.index.json"
_PREFIX = "resnet."  # ResNetForImageClassification wraps ResNetModel under this name
_ARCH_FIELDS = ("layer_type", "embedding_size", "hidden_sizes", "depths")
_MAX_LISTED = 8  # problems listed in one error message
_COMMIT = re.compile(r"[0-9a-f]{40}")
# hub id -> snapshot folder: one process loads the revision it recorded, even if the hub moves
_SNAPSHOTS: dict[str, Path] = {}
_SHA256: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> digest

_Transform = Callable[[np.ndarray], np.ndarray]
_same: _Transform = lambda a: a
# our variable name -> (PyTorch name, checkpoint layout -> ours, ours -> checkpoint layout)
_RENAME: dict[str, tuple[str, _Transform, _Transform]] = {
    "kernel": ("weight", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    "scale": ("weight", _same, _same),
    "bias": ("bias", _same, _same),
    "mean": ("running_mean", _same, _same),
    "var": ("running_var", _same, _same),
}


def _torch_key(path: tuple[Any, ...]) -> tuple[str, str]:
    """transformers ResNetModel key of one of our variables, and our variable name."""
    *module_path, name = (str(p) for p in path)
    return ".".join([*module_path, _RENAME[name][0]]), name


def _ignored(key: str) -> bool:
    """Checkpoint tensors the backbone has no use for (the classifier, PyTorch's counter)."""
    return key.startswith("classifier.") or key.endswith("num_batches_tracked")


def _looks_like_path(source: str) -> bool:
    """A string meant as a local path (a hub id is ``name`` or ``org/name``)."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith(".safetensors")
    )


def _fix_hint() -> str:
    return (
        "Set backbone.pretrained=/path/to/local/dir (a folder with model.safetensors, e.g. a "
        "copy of the hub's microsoft/resnet-50) or backbone.pretrained=null to start from "
        "random weights."
    )


def _download(repo_id: str) -> Path:
    """Fetch only the safetensors and config.json of a hub repo (or find them in the cache).

    The snapshot folder is named by the commit it holds (``.../snapshots/<commit>``), which is
    how :func:`weights_provenance` knows the revision that was loaded.
    """
    if repo_id in _SNAPSHOTS:
        return _SNAPSHOTS[repo_id]
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                repo_id=repo_id,
                allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json"],
            )
        )
        _SNAPSHOTS[repo_id] = folder
        return folder
    except Exception as err:  # network, auth, missing repo, invalid id: all end the same way
        raise ConfigError(
            f"backbone.pretrained='{repo_id}': downloading the weights from the Hugging Face "
            f"hub failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Without network access the hub cannot be used. {_fix_hint()}"
        ) from err


def _locate(source: str) -> tuple[Path, bool]:
    """The local file or folder ``source`` names, and whether it came from the hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path, False
    if _looks_like_path(source):
        raise ConfigError(
            f"backbone.pretrained='{source}': no such file or directory. {_fix_hint()}"
        )
    return _download(source), True


def _resolve(source: str) -> tuple[list[Path], Path | None]:
    """Checkpoint file(s) and the config.json next to them (if any) for ``source``."""
    path, _ = _locate(source)
    if path.is_file():
        config = path.parent / "config.json"
        return [path], config if config.is_file() else None
    config = path / "config.json"
    config_file = config if config.is_file() else None
    if (path / _WEIGHTS_NAME).is_file():
        return [path / _WEIGHTS_NAME], config_file
    if (path / _INDEX_NAME).is_file():
        shards = sorted(set(json.loads((path / _INDEX_NAME).read_text())["weight_map"].values()))
        return [path / s for s in shards], config_file
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found, config_file
    raise ConfigError(
        f"backbone.pretrained='{source}': the folder {path} has no {_WEIGHTS_NAME}"
        + (f" (found {[f.name for f in found]})" if found else "")
        + f". {_fix_hint()}"
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and mtime in this process)."""
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with real.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def _hub_cache_origin(folder: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) when ``folder`` is a Hugging Face cache snapshot, else (None, None).

    The cache layout is ``models--<org>--<name>/snapshots/<40-hex commit>/``.
    """
    folder = folder.absolute()
    if folder.parent.name != "snapshots" or not _COMMIT.fullmatch(folder.name):
        return None, None
    repo = folder.parent.parent.name
    repo_id = (
        repo.removeprefix("models--").replace("--", "/") if repo.startswith("models--") else None
    )
    return repo_id, folder.name


def weights_provenance(source: str) -> dict[str, Any]:
    """What ``source`` resolves to here and now: where, which hub commit, which bytes.

    Recorded in a run's run_config.json at its first start and in results.json, so that
    ``microsoft/resnet-50`` (a moving name) can be pinned again: the ``revision`` is the
    hub commit of the files read, ``sha256`` the digest of the weight file (one per shard in
    ``files``).
    """
    _, from_hub = _locate(source)
    files, config_file = _resolve(source)
    folder = files[0].parent
    repo_id, revision = _hub_cache_origin(folder)
    entries = [{"name": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files]
    return {
        "source": source,
        "kind": "hub" if from_hub else "local",
        "repo_id": source if from_hub else repo_id,
        "revision": revision,
        "path": str(folder.absolute()),
        "sha256": entries[0]["sha256"] if len(entries) == 1 else None,
        "files": entries,
        "config_json_sha256": sha256_file(config_file) if config_file else None,
    }


def _read_tensors(files: list[Path]) -> tuple[dict[str, np.ndarray], int]:
    """Tensors by ResNetModel key (``resnet.`` prefix removed) and the number ignored."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    n_ignored = 0
    for file in files:
        for key, value in load_file(str(file)).items():
            if _ignored(key):
                n_ignored += 1
                continue
            tensors[key.removeprefix(_PREFIX)] = value
    return tensors, n_ignored


def _model_arch(model: ResNet) -> dict[str, Any]:
    return {
        "layer_type": model.layer_type,
        "embedding_size": model.embedding_size,
        "hidden_sizes": list(model.hidden_sizes),
        "depths": list(model.depths),
    }


def _arch_from_tensors(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Architecture implied by the tensor names and shapes (for error messages)."""
    arch: dict[str, Any] = {}
    stem = tensors.get("embedder.embedder.convolution.weight")
    if stem is not None:
        arch["embedding_size"] = int(stem.shape[0])
    pattern = re.compile(
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.weight"
    )
    convs: dict[tuple[int, int, int], tuple[int, ...]] = {}
    for key, value in tensors.items():
        match = pattern.fullmatch(key)
        if match:
            convs[tuple(int(g) for g in match.groups())] = value.shape  # type: ignore[index]
    if convs:
        n_stages = max(s for s, _, _ in convs) + 1
        last_conv = max(c for _, _, c in convs)
        arch["layer_type"] = "bottleneck" if last_conv == 2 else "basic"
        arch["depths"] = [
            max((j for s, j, _ in convs if s == i), default=-1) + 1 for i in range(n_stages)
        ]
        arch["hidden_sizes"] = [
            int(convs[(i, 0, last_conv)][0]) if (i, 0, last_conv) in convs else None
            for i in range(n_stages)
        ]
    return arch


def _check_config_json(config_file: Path | None, model: ResNet, source: str) -> dict[str, Any]:
    """Reject a checkpoint whose config.json describes another architecture."""
    if config_file is None:
        return {}
    hf = json.loads(config_file.read_text())
    unsupported = {
        key: hf[key]
        for key, ok in (
            ("downsample_in_first_stage", False),
            ("downsample_in_bottleneck", False),
            ("hidden_act", "relu"),
            ("num_channels", 3),
        )
        if key in hf and hf[key] != ok
    }
    if unsupported:
        raise ConfigError(
            f"backbone.pretrained='{source}': {config_file} describes a ResNet variant qtl does "
            f"not implement ({unsupported}); qtl's ResNet is v1.5 with ReLU, 3 input channels, "
            "downsample_in_first_stage=false and downsample_in_bottleneck=false."
        )
    arch = {key: hf[key] for key in _ARCH_FIELDS if key in hf}
    ours = _model_arch(model)
    diff = {key: value for key, value in arch.items() if value != ours[key]}
    if diff:
        raise ConfigError(
            f"backbone.pretrained='{source}': {config_file} describes another architecture than "
            f"backbone.*. Change {_format_diff(diff, ours)} to load it, or pick a checkpoint "
            "with the configured shape."
        )
    return arch


def _format_diff(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    return ", ".join(
        f"backbone.{key}={ours[key]} -> {value}"
        for key, value in theirs.items()
        if value != ours[key]
    )


def _mismatch_message(
    source: str,
    files: list[Path],
    model: ResNet,
    tensors: dict[str, np.ndarray],
    missing: list[str],
    reshaped: list[str],
    unexpected: list[str],
) -> str:
    """One paragraph: counts, a few examples of each kind, and which backbone.* to change."""
    per_kind = max(_MAX_LISTED // 3, 1)
    examples = [p for group in (reshaped, missing, unexpected) for p in group[:per_kind]]
    n_total = len(missing) + len(reshaped) + len(unexpected)
    more = f"; ... and {n_total - len(examples)} more" if n_total > len(examples) else ""
    theirs = _arch_from_tensors(tensors)
    diff = _format_diff(theirs, _model_arch(model))
    hint = (
        f"The checkpoint looks like {theirs}; to load it change {diff}."
        if diff
        else "The checkpoint is not a transformers ResNetModel/ResNetForImageClassification "
        "state dict of the configured shape."
    )
    return (
        f"backbone.pretrained='{source}': {', '.join(str(f) for f in files)} does not fit the "
        f"backbone built from backbone.* ({len(reshaped)} tensor(s) with another shape, "
        f"{len(missing)} missing, {len(unexpected)} unexpected; shapes in PyTorch OIHW "
        f"layout): {'; '.join(examples)}{more}. {hint}"
    )


def load_pretrained(model: ResNet, source: str) -> dict[str, Any]:
    """Copy a transformers ResNet checkpoint into ``model`` in place (params and BN statistics).

    ``source`` is a local folder with ``model.safetensors`` (and optionally ``config.json``),
    a ``.safetensors`` file, or a hub id such as ``microsoft/resnet-50``. Returns a small
    report: the source, the files read, how many tensors were loaded and ignored, and the
    :func:`weights_provenance` of what was read.
    """
    files, config_file = _resolve(source)
    _check_config_json(config_file, model, source)
    tensors, n_ignored = _read_tensors(files)

    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    flat = list(nnx.to_flat_state(state))
    planned: list[tuple[Any, np.ndarray]] = []
    missing: list[str] = []
    reshaped: list[str] = []
    used: set[str] = set()
    for path, variable in flat:
        key, name = _torch_key(path)
        to_ours = _RENAME[name][1]
        expected = tuple(variable.shape)
        # shape in the checkpoint's (PyTorch) layout, so it can be compared with what is found
        expected_torch = (
            (expected[3], expected[2], expected[0], expected[1]) if name == "kernel" else expected
        )
        if key not in tensors:
            missing.append(f"missing key {key} (expected shape {expected_torch})")
            continue
        used.add(key)
        found = tuple(tensors[key].shape)
        if found != expected_torch:
            reshaped.append(f"{key}: expected shape {expected_torch}, found {found}")
            continue
        planned.append((variable, to_ours(tensors[key])))
    unexpected = [
        f"unexpected key {key} {tuple(tensors[key].shape)}" for key in sorted(tensors.keys() - used)
    ]

    if missing or reshaped or unexpected:
        raise ConfigError(
            _mismatch_message(source, files, model, tensors, missing, reshaped, unexpected)
        )

    for variable, value in planned:
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    nnx.update(model, state)
    return {
        "source": source,
        "files": [str(f) for f in files],
        "config_json": str(config_file) if config_file else None,
        "n_loaded": len(planned),
        "n_ignored": n_ignored,
        "provenance": weights_provenance(source),
    }


def to_torch_state_dict(model: ResNet) -> dict[str, np.ndarray]:
    """The backbone's weights under transformers ``ResNetModel`` names, in PyTorch layout.

    The inverse of :func:`load_pretrained`: saved with ``safetensors.numpy.save_file`` it
    loads into transformers' ``ResNetModel`` (or back into qtl), so another framework can run
    the very same network.
    """
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    out: dict[str, np.ndarray] = {}
    for path, variable in nnx.to_flat_state(state):
        key, name = _torch_key(path)
        out[key] = np.ascontiguousarray(_RENAME[name][2](np.asarray(variable[...])))
    return out
