"""A run's identity and record: declared in the schema, tolerant of code updates that add a
field, strict about changed values, pinned to the hardware it started on, and a record of the
weights it loaded. No training here: run_config.json files are written and checked directly."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import pytest
from conftest import TINY, compose

from qtl.config import (
    AugmentOn,
    ConfigError,
    TrainConfig,
    check_identity_declarations,
)
from qtl.record.identity import (
    RECORD_VERSION,
    _legacy,
    check_run_dir,
    config_dict,
    fingerprint,
    identity,
)

# What qtl wrote before the identity was declared in the schema: the whole flat config minus
# a hand-kept list of exceptions, with data.augment_on as configured ("auto").
_OLD_EXCEPTIONS = (
    "mode",
    "progress",
    "logger",
    "report",
    "data.workers",
    "data.cache_dir",
    "bench_data",
    "train.log_every",
    "train.eval_batch_size",
    "head.max_state_mb",
    "head.native_kernel",
    "bench_circuit",
    "bench_step",
)


def _old_identity(cfg) -> dict:
    flat: dict = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", config_dict(cfg))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == s or k.startswith(s + ".") for s in _OLD_EXCEPTIONS)
    }


def _cfg(*extra: str):
    return compose(*TINY, "backbone.pretrained=null", "head=cdl", *extra)


@pytest.fixture(scope="module")
def base():
    return _cfg()


def _start(tmp_path: Path, cfg) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "run_config.json"
    check_run_dir(copy.deepcopy(cfg), run_dir, path)
    return run_dir, path


def _edit(path: Path, fn) -> None:
    record = json.loads(path.read_text())
    fn(record)
    path.write_text(json.dumps(record))


# --- the declaration ---------------------------------------------------------------------------


def test_every_field_is_declared_identity_or_operational():
    check_identity_declarations()

    @dataclasses.dataclass
    class Sloppy:
        a: int = 0
        b: int = 0
        IDENTITY = ("a",)
        OPERATIONAL = ()

    with pytest.raises(TypeError, match=r"Sloppy.*not declared.*\['b'\]"):
        check_identity_declarations(Sloppy)


def test_identity_is_the_declared_fields(base):
    ident = identity(base)
    for key in ("seed", "task.labels", "train.lr", "data.synth_sizes.train", "head.name"):
        assert key in ident
    for key in ("name", "mode", "task.name", "backbone.name", "data.workers", "train.log_every"):
        assert key not in ident
    assert not any(k.startswith(("logger", "report", "bench_")) for k in ident)
    assert ident["data.augment_on"] == ("host" if jax.default_backend() == "cpu" else "device")


@pytest.mark.parametrize(
    "override",
    [
        "data.workers=3",
        "train.eval_batch_size=7",
        "train.log_every=1",
        "head.max_state_mb=1",
        "head.native_kernel=false",
        "backbone.conv1x1_as_matmul=false",
        "name=renamed",
        "logger=wandb",
        "progress=true",
    ],
)
def test_operational_settings_keep_the_fingerprint(base, override):
    assert fingerprint(_cfg(override)) == fingerprint(base)


@pytest.mark.parametrize(
    "override",
    ["train.lr=0.5", "seed=3", "data.crop=24", "backbone.batch_norm=batch", "head=dqc"],
)
def test_defining_settings_change_the_fingerprint(base, override):
    assert fingerprint(_cfg(override)) != fingerprint(base)


def test_auto_augmentation_is_identified_by_its_placement(base):
    here = "host" if jax.default_backend() == "cpu" else "device"
    other = "device" if here == "host" else "host"
    assert fingerprint(_cfg(f"data.augment_on={here}")) == fingerprint(base)
    assert fingerprint(_cfg(f"data.augment_on={other}")) != fingerprint(base)


def test_a_field_at_its_legacy_value_leaves_the_fingerprint_alone(base, monkeypatch):
    """As if train.min_delta had been added by a code update, declared LEGACY 0.0."""
    before = fingerprint(base)
    # the fields a code update already added (declared LEGACY and at that value) stay out too
    dropped = {k for k, v in identity(base).items() if _legacy(base, k) == (v, True)}
    assert "train.min_delta" not in dropped
    declared = {**getattr(TrainConfig, "LEGACY", {}), "min_delta": 0.0}
    monkeypatch.setattr(TrainConfig, "LEGACY", declared, raising=False)
    kept = {k: v for k, v in identity(base).items() if k not in dropped | {"train.min_delta"}}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    assert fingerprint(base) == hashlib.sha256(blob).hexdigest()[:16] != before
    assert fingerprint(_cfg("train.min_delta=0.1")) != fingerprint(base)


# --- resuming against a record -----------------------------------------------------------------


def test_first_start_writes_a_versioned_record(tmp_path, base):
    _, path = _start(tmp_path, base)
    record = json.loads(path.read_text())
    assert {"fingerprint", "identity", "config"} <= set(record)  # the format readers know
    assert record["record_version"] == RECORD_VERSION
    assert record["fingerprint"] == fingerprint(base)
    assert record["identity"] == identity(base)
    # the placement is resolved in the record's config too: what ran, not "auto"
    assert record["config"]["data"]["augment_on"] == record["identity"]["data.augment_on"]
    assert record["runtime"]["platform"] == jax.default_backend()
    assert record["runtime"]["augment"] == record["identity"]["data.augment_on"]
    assert record["runtime"]["versions"]["jax"] == jax.__version__
    assert record["provenance"]["weights"] == {"source": None, "kind": "random_init", "seed": 0}


def test_a_record_that_lacks_a_field_still_resumes_and_is_upgraded(tmp_path, base):
    run_dir, path = _start(tmp_path, base)
    _edit(path, lambda r: r["identity"].pop("train.min_delta"))  # "an older qtl"
    check_run_dir(copy.deepcopy(base), run_dir, path)
    record = json.loads(path.read_text())
    assert record["identity"]["train.min_delta"] == 0.0
    (upgrade,) = record["upgrades"]
    assert "train.min_delta" not in upgrade["identity_before"]


def test_a_lacking_field_with_another_value_now_is_refused(tmp_path, base):
    run_dir, path = _start(tmp_path, base)
    _edit(path, lambda r: r["identity"].pop("train.min_delta"))
    with pytest.raises(ConfigError, match=r"train\.min_delta: absent there.*0\.0\), 0\.25 now"):
        check_run_dir(_cfg("train.min_delta=0.25"), run_dir, path)


def test_a_lacking_field_is_matched_against_its_declared_legacy_value(tmp_path, base, monkeypatch):
    """A new field whose default changes behaviour declares what older runs computed."""
    run_dir, path = _start(tmp_path, base)
    _edit(path, lambda r: r["identity"].pop("train.min_delta"))
    monkeypatch.setattr(TrainConfig, "LEGACY", {"min_delta": 0.25}, raising=False)
    with pytest.raises(ConfigError, match=r"train\.min_delta: absent there.*0\.25\), 0\.0 now"):
        check_run_dir(copy.deepcopy(base), run_dir, path)
    check_run_dir(_cfg("train.min_delta=0.25"), run_dir, path)


def test_changed_values_are_refused_with_every_differing_key(tmp_path, base):
    run_dir, path = _start(tmp_path, base)
    before = path.read_bytes()
    with pytest.raises(
        ConfigError, match=r"seed: 0 there, 3 now; train\.lr: 0\.001 there, 0\.5 now"
    ):
        check_run_dir(_cfg("train.lr=0.5", "seed=3"), run_dir, path)
    assert path.read_bytes() == before


def test_keys_only_the_record_has_are_ignored(tmp_path, base):
    run_dir, path = _start(tmp_path, base)
    _edit(path, lambda r: r["identity"].update({"train.retired_knob": 3, "name": "x"}))
    check_run_dir(copy.deepcopy(base), run_dir, path)


def test_operational_changes_resume(tmp_path, base):
    run_dir, path = _start(tmp_path, base)
    check_run_dir(_cfg("data.workers=2", "train.eval_batch_size=5", "name=other"), run_dir, path)


def test_a_record_from_before_declared_identities_resumes(tmp_path, base, capsys):
    """The old format: no record_version, identity = config minus exceptions, with "auto"."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "run_config.json"
    old = {"fingerprint": "0123456789abcdef", "identity": _old_identity(base)}
    assert old["identity"]["data.augment_on"] == "auto" and "name" in old["identity"]
    path.write_text(json.dumps({**old, "config": config_dict(base)}))
    cfg = copy.deepcopy(base)
    check_run_dir(cfg, run_dir, path)
    here = "host" if jax.default_backend() == "cpu" else "device"
    assert cfg.data.augment_on == AugmentOn(here)
    assert "predates recorded augmentation placements" in capsys.readouterr().out
    record = json.loads(path.read_text())
    assert record["record_version"] == RECORD_VERSION
    assert record["identity"]["data.augment_on"] == here
    assert record["upgrades"][0]["identity_before"] == old["identity"]
    assert record["upgrades"][0]["recorded_now"] == ["provenance", "runtime"]
    assert record["config"] == config_dict(base)  # what the run started with, kept
    # the old record's changed value is still caught
    path.write_text(json.dumps({**old, "config": config_dict(base)}))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        check_run_dir(_cfg("train.lr=0.5"), run_dir, path)


def test_resume_keeps_the_recorded_augmentation_placement(tmp_path, base, capsys):
    """A run started where auto meant the other placement (another machine) keeps it."""
    here = "host" if jax.default_backend() == "cpu" else "device"
    other = "device" if here == "host" else "host"
    run_dir, path = _start(tmp_path, base)
    _edit(path, lambda r: r["identity"].update({"data.augment_on": other}))
    cfg = copy.deepcopy(base)
    check_run_dir(cfg, run_dir, path)
    assert cfg.data.augment_on == AugmentOn(other)
    out = capsys.readouterr().out
    assert f"started with augmentation on the {other} and continues there" in out
    assert fingerprint(cfg) == fingerprint(_cfg(f"data.augment_on={other}")) != fingerprint(base)
    # asking for this machine's placement explicitly is a different run
    with pytest.raises(ConfigError, match=rf"data\.augment_on: '{other}' there, '{here}' now"):
        check_run_dir(_cfg(f"data.augment_on={here}"), run_dir, path)


def test_runtime_differences_are_reported(tmp_path, base, capsys):
    run_dir, path = _start(tmp_path, base)
    (run_dir / "checkpoints" / "last" / "3").mkdir(parents=True)  # a resume, not a restart

    def other_machine(record):
        record["runtime"].update(platform="tpu", fast_max_state_mb=2048.0)
        record["runtime"]["versions"]["jax"] = "0.0.1"

    _edit(path, other_machine)
    check_run_dir(copy.deepcopy(base), run_dir, path)
    out = capsys.readouterr().out
    assert "runs differently from the run's first session" in out
    assert f"platform 'tpu' -> '{jax.default_backend()}'" in out
    assert "fast_max_state_mb 2048.0 -> None" in out  # a CDL run has no simulator
    assert f"jax 0.0.1 -> {jax.__version__}" in out
    assert json.loads(path.read_text())["runtime"]["platform"] == "tpu"  # first session kept


def test_an_unreadable_record_is_a_clear_error(tmp_path, base):
    run_dir, path = _start(tmp_path, base)
    path.write_text('{"fingerprint": "abc", "ident')  # cut short
    with pytest.raises(ConfigError, match=r"run_config\.json is not a readable run record"):
        check_run_dir(copy.deepcopy(base), run_dir, path)


# --- weights provenance ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A tiny backbone saved as transformers' ResNetModel would (model.safetensors)."""
    from flax import nnx

    from qtl.models.resnet import ResNet
    from qtl.studies.pretrain import save_hf_backbone

    cfg = _cfg()
    return save_hf_backbone(
        ResNet(cfg.backbone, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("w") / "tiny"
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_weights_are_recorded_by_hash(tmp_path, weights_dir):
    from qtl.models.hf_import import load_pretrained
    from qtl.studies.cxr import CxrStudy
    from qtl.studies.pretrain import build_pretrained_model

    cfg = _cfg(f"backbone.pretrained={weights_dir}")
    run_dir, path = _start(tmp_path, cfg)
    weights = json.loads(path.read_text())["provenance"]["weights"]
    assert weights["kind"] == "local" and weights["revision"] is None
    assert weights["sha256"] == _sha(weights_dir / "model.safetensors")
    assert weights["files"] == [
        {
            "name": "model.safetensors",
            "sha256": weights["sha256"],
            "bytes": (weights_dir / "model.safetensors").stat().st_size,
        }
    ]
    assert weights["config_json_sha256"] == _sha(weights_dir / "config.json")
    report = load_pretrained(
        build_pretrained_model(_cfg(), 0, CxrStudy()).backbone, str(weights_dir)
    )
    assert report["provenance"] == weights  # the same resolution the loader used


def test_hub_weights_are_recorded_with_the_commit(tmp_path, weights_dir, monkeypatch):
    """The hub's cache layout: models--org--name/snapshots/<commit>/ (no network here)."""
    import huggingface_hub

    import qtl.models.hf_import as hf

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--someorg--tiny-resnet" / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snap / name).write_bytes((weights_dir / name).read_bytes())
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(hf, "_SNAPSHOTS", {})
    weights = hf.weights_provenance("someorg/tiny-resnet")
    assert weights["kind"] == "hub" and weights["repo_id"] == "someorg/tiny-resnet"
    assert weights["revision"] == commit
    assert weights["sha256"] == _sha(weights_dir / "model.safetensors")
    # a local copy of a cache snapshot still says where it came from
    local = hf.weights_provenance(str(snap))
    assert local["kind"] == "local" and local["revision"] == commit
    assert local["repo_id"] == "someorg/tiny-resnet"
    hf.weights_provenance("someorg/tiny-resnet")
    assert calls == ["someorg/tiny-resnet"]  # one resolution per process: the loader's too


def test_weights_that_changed_since_the_first_start_are_noted(tmp_path, weights_dir, capsys):
    copy_dir = tmp_path / "weights"
    copy_dir.mkdir()
    for name in ("model.safetensors", "config.json"):
        (copy_dir / name).write_bytes((weights_dir / name).read_bytes())
    cfg = _cfg(f"backbone.pretrained={copy_dir}")
    run_dir, path = _start(tmp_path, cfg)
    first = json.loads(path.read_text())["provenance"]["weights"]
    blob = bytearray((copy_dir / "model.safetensors").read_bytes())
    blob[-1] ^= 1  # one weight changed in place
    (copy_dir / "model.safetensors").write_bytes(bytes(blob))
    (run_dir / "checkpoints" / "last" / "6").mkdir(parents=True)
    check_run_dir(copy.deepcopy(cfg), run_dir, path)
    assert "continues from its checkpoint" in capsys.readouterr().out
    assert json.loads(path.read_text())["provenance"]["weights"] == first
    # without a checkpoint the run starts over from the new weights: the record follows
    for child in sorted((run_dir / "checkpoints").rglob("*"), reverse=True):
        child.rmdir()
    check_run_dir(copy.deepcopy(cfg), run_dir, path)
    assert "no checkpoint exists yet" in capsys.readouterr().out
    now = json.loads(path.read_text())["provenance"]["weights"]
    assert now["sha256"] == _sha(copy_dir / "model.safetensors") != first["sha256"]
