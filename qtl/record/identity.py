"""A run's identity and record: what it computes, what it loaded, where it ran.

``run_config.json`` in a run directory is written at the run's first start::

    {"fingerprint": ..., "identity": {flat key: value}, "config": {the whole config},
     "record_version": 4, "runtime": {...}, "provenance": {"weights": {...}}}

``identity`` holds the fields the schema declares IDENTITY (:mod:`qtl.config`), flattened
(``train.lr``, ``data.synth_sizes.train``), with ``data.augment_on=auto`` resolved to the
placement this machine chose. A rerun in the same directory must agree on it:

- a key the record lacks (written by a qtl without that field) matches the field's legacy
  value (``LEGACY``, else the schema default), so a code update that adds a field keeps
  every run directory resumable as long as the run keeps the old behaviour;
- a key only the record has (a field that is no longer identity, or no longer exists) is
  ignored;
- any other difference refuses the directory, naming the keys.

The data is named by content, not by path (record version 4): ``data.content.<part>`` holds
the hashes of its label files and of its image set's manifest (:mod:`qtl.data.content`; the
study says which), and ``data.root`` and the other data paths are OPERATIONAL, so a dataset
may move (to a node's scratch disk) and its runs still resume; one changed label refuses
the directory. A content key only the record has (an external test set dropped since) is a
difference too. A record of version <= 3 named its data by path: it is checked on those
paths, as the qtl that wrote it did, and upgraded with the content on that resume.

Hardware-dependent settings: ``data.augment_on=auto`` is pinned to the recorded placement on
resume (host and device augmentation differ in rounding and at the border), so a run started
on a CPU continues with host augmentation on a GPU, with a note; an explicit other placement
is a changed identity and refused. The fast simulator's chunk size and the native kernel are
OPERATIONAL (tested equal to float rounding): their resolved values, the platform and the
package versions are recorded per session (``runtime``), and a resume that differs prints
what changed. Records without ``record_version`` predate all this (their identity holds
``auto``); they are checked as far as they go and upgraded on the next resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from qtl.config import AugmentOn, ConfigError, HeadName, QtlConfig, Simulator

# 3: the identity holds only the fields of the run's study; 4: the data by content, not path
RECORD_VERSION = 4
CONTENT = "data.content."  # prefix of the data's content keys in an identity
_PACKAGES = ("qtl", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "pennylane")
_UNKNOWN = object()  # a key with no legacy value (e.g. task.labels): its absence never matches


def config_dict(cfg: QtlConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able containers (what W&B and run_config.json get)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _flatten(key: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{key}.{k}", v, out)
    else:
        out[key] = value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def identity(cfg: QtlConfig, study: Any = None, *, by_path: bool | None = None) -> dict[str, Any]:
    """The schema's IDENTITY fields of ``cfg``, flat, with ``data.augment_on`` resolved;
    with ``study`` (a :class:`qtl.studies.base.Study`), only those that define its runs, and
    the data's content (``data.content.<part>``: :meth:`Study.data_content`).

    ``by_path``: the data's paths (``FORMER_IDENTITY``) in place of its content, as record
    versions <= 3 and the caches keyed then named it; always so without ``study``.
    """
    from qtl.data.augment import resolve_augment_on

    by_path = study is None if by_path is None else by_path
    flat: dict[str, Any] = {}

    def walk(obj: Any, node: dict[str, Any], prefix: str) -> None:
        former = getattr(type(obj), "FORMER_IDENTITY", ()) if by_path else ()
        for name in (*type(obj).IDENTITY, *former):
            if dataclasses.is_dataclass(getattr(obj, name)):
                walk(getattr(obj, name), node[name], f"{prefix}{name}.")
            else:
                _flatten(f"{prefix}{name}", node[name], flat)

    walk(cfg, config_dict(cfg), "")
    flat["data.augment_on"] = resolve_augment_on(cfg.data).value
    if study is None:
        return flat
    out = {key: flat[key] for key in study.identity_keys(list(flat))}
    if not by_path:
        content = study.data_content(cfg)
        out |= {f"{CONTENT}{part}": digest for part, digest in sorted(content.items())}
    return out


def _legacy(cfg: QtlConfig, key: str) -> tuple[Any, bool]:
    """(value, declared): what a qtl without ``key`` computed as; declared = listed in LEGACY.

    ``_UNKNOWN`` when the field has no default (then a record without it never matches).
    """
    obj: Any = cfg
    parts = key.split(".")
    while parts:
        name = parts.pop(0)
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, name):
            return _UNKNOWN, False
        if dataclasses.is_dataclass(getattr(obj, name)):
            obj = getattr(obj, name)
            continue
        legacy = getattr(type(obj), "LEGACY", {})
        field = {f.name: f for f in dataclasses.fields(obj)}[name]
        if name in legacy:
            value, declared = legacy[name], True
        elif field.default is not dataclasses.MISSING and field.default != MISSING:
            value, declared = field.default, False
        elif field.default_factory is not dataclasses.MISSING:
            value, declared = field.default_factory(), False
        else:
            return _UNKNOWN, False
        for part in parts:  # a key inside a dict-valued field (data.synth_sizes.train)
            if not isinstance(value, dict) or part not in value:
                return _UNKNOWN, False
            value = value[part]
        return _jsonable(value), declared
    return _UNKNOWN, False


def fingerprint(cfg: QtlConfig, study: Any = None, *, by_path: bool | None = None) -> str:
    """Hash of everything that determines a run's result (of ``study``: its identity keys,
    and its data's content).

    Fields at their declared LEGACY value are left out, so adding a field that keeps the old
    behaviour leaves every fingerprint (and every cache keyed by one) as it was. Without
    ``study``, every schema identity field counts, with the data's paths: the fingerprint qtl
    computed before studies chose their identity (record version 2), which caches keyed then
    are found by. ``by_path=True`` with ``study``: record version 3's (the data's paths, not
    its content).
    """
    ident = identity(cfg, study, by_path=by_path)
    if study is not None and not ident.keys() & _former_keys(cfg):
        # the data's paths enter as null (as every run of generated data had them), so the
        # fingerprints of such runs (and the caches keyed by them) are the ones recorded
        # before the data's content took the paths' place
        ident |= {key: None for key in study.identity_keys(sorted(_former_keys(cfg)))}
    kept = {}
    for key, value in ident.items():
        legacy, declared = _legacy(cfg, key)
        if not (declared and legacy == value):
            kept[key] = value
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def identity_diffs(cfg: QtlConfig, theirs: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Readable differences between a recorded identity and ``cfg``'s (see module doc)."""
    diffs = [  # data recorded there (an external test set) and not now: other results
        f"{key}: {theirs[key]!r} there, absent now"
        for key in sorted(theirs)
        if key.startswith(CONTENT) and key not in mine
    ]
    for key in sorted(mine):
        if key in theirs:
            if theirs[key] != mine[key]:
                diffs.append(f"{key}: {theirs[key]!r} there, {mine[key]!r} now")
            continue
        legacy, _ = _legacy(cfg, key)
        if legacy is _UNKNOWN:
            diffs.append(f"{key}: absent there (no default to assume), {mine[key]!r} now")
        elif legacy != mine[key]:
            diffs.append(
                f"{key}: absent there (recorded by a qtl without it, which computed as "
                f"{legacy!r}), {mine[key]!r} now"
            )
    return diffs


def _former_keys(cfg: QtlConfig) -> set[str]:
    """The flat keys of the fields that were identity before the data's content was."""
    out = set()
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            out |= {f"{f.name}.{n}" for n in getattr(type(sub), "FORMER_IDENTITY", ())}
    return out


def runtime_settings(cfg: QtlConfig) -> dict[str, Any]:
    """Hardware- and install-dependent settings as this session resolves them."""
    import jax

    from qtl.data.augment import placement

    out: dict[str, Any] = {
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "augment": placement(cfg.data),  # host | device | None (augmentation off)
    }
    if cfg.head.name == HeadName.dqc and cfg.head.simulator == Simulator.fast:
        from qtl.models.heads import circuit_spec
        from qtl.quantum.fast import default_state_mb, native_ok

        mb = cfg.head.max_state_mb
        out["fast_max_state_mb"] = float(mb if mb is not None else default_state_mb())
        real = circuit_spec(cfg.head, len(cfg.task.labels)).is_real
        out["fast_native_kernel"] = bool(cfg.head.native_kernel and real and native_ok())
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    out["versions"] = versions
    return out


def attempt(cfg: QtlConfig) -> dict[str, Any]:
    """This start's topology, appended to the record's ``attempts`` (a run may resume on
    another number of devices: that is how it is computed, not which run it is). Resolving
    ``train.devices`` here refuses, before any work, more devices than this process sees."""
    import platform as _platform

    from qtl.utils.mesh import resolve

    tc = cfg.train
    topology = resolve(
        tc.devices,
        [("train.batch_size", tc.batch_size), ("train.eval_batch_size", tc.eval_batch_size)],
    )
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": _platform.node(),
        **topology.describe(),
    }


def read_record(path: Path) -> dict[str, Any]:
    """run_config.json, or a ConfigError that says what to do with an unreadable one."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not isinstance(record.get("identity", {}), dict):
            raise ValueError("not a JSON object with an 'identity' object")
        return record
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path} is not a readable run record ({type(err).__name__}: {err}). Nothing was "
            "changed. If this run directory is yours, move that file away and rerun: it is "
            "recorded again from this config, and the checkpoints are still checked against "
            "the model's structure."
        ) from err


def _write(path: Path, record: dict[str, Any]) -> None:
    from qtl.record.files import write_json_atomic

    write_json_atomic(path, json.loads(json.dumps(record, default=str)))


def _has_checkpoint(run_dir: Path) -> bool:
    last = run_dir / "checkpoints" / "last"
    return last.is_dir() and any(p.name.isdigit() for p in last.iterdir())


def _pin_augmentation(cfg: QtlConfig, theirs: dict[str, Any], notes: list[str]) -> bool:
    """Make ``cfg.data.augment_on`` the recorded placement when it says auto.

    Returns True when the record did not know the placement (a record from before it was
    recorded): then this session's choice is taken, and recorded.
    """
    from qtl.data.augment import resolve_augment_on

    here = resolve_augment_on(cfg.data)
    recorded = theirs.get("data.augment_on")
    if recorded in (None, AugmentOn.auto.value):
        if cfg.data.augment_on == AugmentOn.auto:
            cfg.data.augment_on = here
        theirs["data.augment_on"] = now = cfg.data.augment_on.value
        notes.append(
            "the run record predates recorded augmentation placements, so where its earlier "
            f"sessions augmented is unknown; from now on it augments on the {now} (recorded, "
            "and kept by later resumes)"
        )
        return True
    if cfg.data.augment_on == AugmentOn.auto:
        cfg.data.augment_on = AugmentOn(recorded)
        if here.value != recorded:
            notes.append(
                f"data.augment_on=auto: this run started with augmentation on the {recorded} "
                f"and continues there (this machine alone would choose the {here.value}), so "
                "every epoch sees the same implementation"
            )
    return False


def _runtime_notes(first: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    if not first:
        return []
    changed = [
        f"{key} {first.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(first) | set(now))
        if key != "versions" and first.get(key) != now.get(key)
    ]
    versions = [
        f"{pkg} {first.get('versions', {}).get(pkg)} -> {v}"
        for pkg, v in now.get("versions", {}).items()
        if first.get("versions", {}).get(pkg) != v
    ]
    if not changed and not versions:
        return []
    return [
        "this session runs differently from the run's first session ("
        + "; ".join(changed + versions)
        + "); the simulator's chunking and native kernel are tested to change results only "
        "by float rounding, and results.json records both sessions"
    ]


def _weights_note(first: dict[str, Any], now: dict[str, Any], restarting: bool) -> str | None:
    keys = ("sha256", "files", "revision")
    if all(first.get(k) == now.get(k) for k in keys):
        return None
    then = first.get("revision") or first.get("sha256")
    later = now.get("revision") or now.get("sha256")
    if restarting:
        return (
            f"backbone.pretrained={now.get('source')!r} now resolves to other weights ({then} "
            f"when this run was recorded, {later} now); no checkpoint exists yet, so the run "
            "starts from these and the record is updated"
        )
    return (
        f"backbone.pretrained={now.get('source')!r} now resolves to other weights ({then} at "
        f"the first start, {later} now); the run continues from its checkpoint, so training "
        "is unaffected, and results.json keeps the weights it started from"
    )


def check_run_dir(
    cfg: QtlConfig,
    run_dir: Path,
    path: Path,
    *,
    weights: str | None = None,
    study: Any = None,
    provenance: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Refuse a run directory started with another config; record the run otherwise.

    ``study``: whose identity keys define the run (None: every schema identity field).
    ``provenance``: what the run's weights start from (the study's); without it, the
    backbone's starting weights ``weights`` as the application resolved them (for
    ``backbone.pretrained=synthetic``, the folder qtl pretrained), recorded with their hash.

    Resolves ``data.augment_on=auto`` in ``cfg`` in place (the recorded placement on a
    resume, this machine's choice at a first start), so every later part of the run sees
    the placement it records.
    """
    from qtl.data.augment import resolve_augment_on

    if provenance is None:
        from qtl.models.classifier import weights_provenance

        def provenance() -> dict[str, Any]:
            return weights_provenance(cfg, weights)

    run_dir = Path(run_dir)
    if not path.exists():
        cfg.data.augment_on = resolve_augment_on(cfg.data)
        loaded = provenance()  # first: a weights problem records nothing
        record = {
            "fingerprint": fingerprint(cfg, study),
            "identity": identity(cfg, study),
            "config": config_dict(cfg),
            "record_version": RECORD_VERSION,
            "runtime": runtime_settings(cfg),
            "provenance": {"weights": loaded},
            "attempts": [attempt(cfg)],
        }
        _write(path, record)
        return
    record = read_record(path)
    theirs = dict(record.get("identity", {}))
    notes: list[str] = []
    placement_unknown = _pin_augmentation(cfg, theirs, notes)
    mine = identity(cfg, study)
    # a record of version <= 3 named its data by path: checked on those paths (what that qtl
    # did), then upgraded with the data's content, after which the data may move
    by_path = study is not None and record.get("record_version", 1) < 4
    diffs = identity_diffs(cfg, theirs, identity(cfg, study, by_path=True) if by_path else mine)
    if diffs:
        moved = by_path and any(d.split(":")[0] in _former_keys(cfg) for d in diffs)
        raise ConfigError(
            f"run directory {run_dir} belongs to a run with a different config "
            f"({'; '.join(diffs[:6])}{'; ...' * (len(diffs) > 6)}). Nothing was changed "
            "there. Pick another experiment name (name=...) or hydra.run.dir=..., or delete "
            "that directory to start it over."
            + (
                " Its record (written by an older qtl) names the data by path, so the run "
                "is found only with the data where it was; an unfinished run rerun there "
                "records the data's content, and from then on the data may move."
            )
            * moved
        )
    if (run_dir / "results.json").exists():
        return  # finished: nothing runs, nothing to record
    runtime = runtime_settings(cfg)
    loaded = provenance()
    restarting = not _has_checkpoint(run_dir)
    update_attempts = [*record.get("attempts", []), attempt(cfg)]
    recorded_weights = (record.get("provenance") or {}).get("weights")
    update: dict[str, Any] = {"attempts": update_attempts}
    if recorded_weights is None:
        update["provenance"] = {**(record.get("provenance") or {}), "weights": loaded}
    elif note := _weights_note(recorded_weights, loaded, restarting):
        notes.append(note)
        if restarting:  # the run starts over from these weights: they are its weights now
            update["provenance"] = {**record["provenance"], "weights": loaded}
    if record.get("runtime") is None or (restarting and record["runtime"] != runtime):
        update["runtime"] = runtime
    else:
        notes += _runtime_notes(record["runtime"], runtime)
    if placement_unknown or by_path or set(mine) - set(record.get("identity", {})):
        # an older record: write what this qtl checks, keeping what the run started with
        update |= {
            "fingerprint": fingerprint(cfg, study),
            "identity": mine,
            "upgrades": [
                *record.get("upgrades", []),
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "from_record_version": record.get("record_version", 1),
                    "identity_before": record.get("identity", {}),
                    # runtime/weights missing there are this session's, not the first one's
                    "recorded_now": sorted(k for k in ("runtime", "provenance") if k in update),
                },
            ],
        }
    if update:
        _write(path, {**record, **update, "record_version": RECORD_VERSION})
    for note in notes:
        print(f"[qtl] note: {run_dir}: {note}")


def run_provenance(cfg: QtlConfig, path: Path) -> dict[str, Any]:
    """results.json's record of what the run loaded and where its sessions ran."""
    record = read_record(path) if Path(path).exists() else {}
    return {
        "weights": (record.get("provenance") or {}).get("weights"),
        "runtime": {"first_session": record.get("runtime"), "this_session": runtime_settings(cfg)},
        "fingerprint": record.get("fingerprint"),
        "record_version": record.get("record_version"),
    }
