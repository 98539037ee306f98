"""Nothing already computed is orphaned by the per-study identity: run records and teacher
folders written by qtl before ``qtl.studies`` (record version 2, identity over every schema
field; tests/data/records_v2, written by ``debug=tiny head=cdl`` and ``debug=tiny_medmnist
model=qvit [distill=joint]``) are still resumed, reported and reused; and ``--cfg job`` shows
the values it showed then (tests/data/cfg_job_v2, ``launch.py --cfg job ...`` of that qtl)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, compose

from qtl.config import ConfigError
from qtl.record.identity import RECORD_VERSION, check_run_dir, fingerprint, identity
from qtl.record.schema import Results
from qtl.studies import study_for
from qtl.studies.cxr import CxrStudy
from qtl.studies.medmnist import MedmnistStudy

DATA = Path(__file__).parent / "data"
RECORDS = DATA / "records_v2"
TINY_CXR = ("debug=tiny", "head=cdl")
TINY_QVIT = ("debug=tiny_medmnist", "model=qvit")


def _copy(name: str, tmp_path: Path) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(RECORDS / name, run_dir)
    return run_dir


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("cxr8-cdl", TINY_CXR), ("retinamnist-qvit-kd_joint", (*TINY_QVIT, "distill=joint"))],
)
def test_finished_runs_of_the_previous_record_are_reported_not_retrained(
    tmp_path, capsys, name, overrides
):
    from qtl.train.driver import train_and_evaluate

    run_dir = _copy(name, tmp_path)
    before = (run_dir / "run_config.json").read_text()
    cfg = compose(*overrides)
    study = study_for(cfg)
    out = train_and_evaluate(cfg, run_dir, study)  # no weights, no teacher: nothing trains
    assert "finished already" in capsys.readouterr().out
    assert out == Results.from_json(json.loads((run_dir / "results.json").read_text())).to_json()
    assert (run_dir / "run_config.json").read_text() == before  # untouched
    assert not (run_dir / "checkpoints").exists()


def test_unfinished_qvit_run_of_the_previous_record_resumes_and_a_real_change_is_refused(
    tmp_path,
):
    run_dir = _copy("retinamnist-qvit-unfinished", tmp_path)
    path = run_dir / "run_config.json"
    old = json.loads(path.read_text())
    # the old identity held the CXR fields; the study's identity is a part of it, and agrees
    cfg = compose(*TINY_QVIT)
    mine = identity(cfg, MedmnistStudy())
    # study: new, null = as before; the data's content: new, recorded on this resume
    content = {k for k in mine if k.startswith("data.content.")}
    # shots, gradient and noise: new, at legacy values (exact <Z>) that are what it computed
    exact = {k for k in mine if k.startswith(("model.circuit.noise.", "model.circuit.shots",
                                             "model.circuit.gradient"))}  # fmt: skip
    # the PennyLane device: new, null = qtl's own simulator, what it ran on
    exact |= {k for k in mine if k.startswith("model.circuit.device.")}
    assert content and exact and set(mine) - {"study"} - content - exact < set(old["identity"])
    assert not any(k.startswith(("head.", "backbone.", "task.")) for k in mine)
    check_run_dir(cfg, run_dir, path, study=MedmnistStudy(), provenance=dict)
    # a CXR-only setting no longer orphans the QViT run ...
    check_run_dir(
        compose(*TINY_QVIT, "data.resize=40", "task=cxr19"),
        run_dir,
        path,
        study=MedmnistStudy(),
        provenance=dict,
    )
    # ... while a field of its own still refuses the directory
    with pytest.raises(ConfigError, match="model.hidden_size"):
        check_run_dir(
            compose(*TINY_QVIT, "model.hidden_size=8"),
            run_dir,
            path,
            study=MedmnistStudy(),
            provenance=dict,
        )
    # the resumed record is upgraded to this qtl's identity, keeping the one it started with
    now = json.loads(path.read_text())
    assert now["record_version"] == RECORD_VERSION and now["identity"] == mine
    assert now["upgrades"][-1]["identity_before"] == old["identity"]
    assert now["upgrades"][-1]["from_record_version"] == 2


def test_cxr_fingerprints_are_unchanged():
    """CXR runs' fingerprints (results.json, caches keyed by them) are the ones recorded."""
    for name, overrides in [("cxr8-cdl", TINY_CXR)]:
        record = json.loads((RECORDS / name / "run_config.json").read_text())
        cfg = compose(*overrides)
        cfg.data.augment_on = type(cfg.data.augment_on)(record["identity"]["data.augment_on"])
        assert fingerprint(cfg, CxrStudy()) == record["fingerprint"] == fingerprint(cfg)


def test_teacher_folder_of_the_previous_key_is_reused(tmp_path):
    from qtl.studies.teacher import preset_teacher_dir

    folder = (RECORDS / "teacher" / "FOLDER").read_text().strip()
    pretrained = tmp_path / "pretrained"
    cfg = compose(*TINY_QVIT, "distill=joint", f"paths.pretrained_dir={pretrained}")
    study = MedmnistStudy()
    _, fresh = preset_teacher_dir(cfg, study)
    assert fresh.parent.name != folder  # the key is over the study's identity now
    run = pretrained / folder / "run"
    shutil.copytree(RECORDS / "teacher", run)
    tcfg, found = preset_teacher_dir(cfg, study)
    assert found == run  # a finished teacher under the old key: reused, not retrained
    # and it resumes as a run of its study (its identity check passes)
    check_run_dir(tcfg, run, run / "run_config.json", study=study, provenance=dict)


def _job(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from qtl.studies import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


EXACT_NOISE = {
    "depolarizing": 0.0,
    "depolarizing_2q": None,
    "amplitude_damping": 0.0,
    "phase_damping": 0.0,
    "readout": 0.0,
    "device_model": None,
    "trajectories": 1,
}


def _pop_noise_cases(bench_circuit: dict) -> None:
    """mode=bench_circuit's shots/trajectories cases: added since, off by default."""
    assert bench_circuit.pop("noise_cases") == []
    for key in ("noise_shots", "noise_trajectories", "noise_depolarizing"):
        bench_circuit.pop(key)


@pytest.mark.parametrize(
    ("snapshot", "overrides"),
    [
        ("default", []),
        ("qvit", ["experiment=qvit"]),
        ("tiny", ["debug=tiny"]),
        ("tiny_medmnist", ["debug=tiny_medmnist", "model=qvit", "distill=joint"]),
        ("demo_qvit", ["experiment=demo_qvit", "model=vit"]),
        ("bench_circuit", ["mode=bench_circuit", "bench_circuit.qubits=[14,19]"]),
    ],
)
def test_cfg_job_shows_the_values_it_showed_before(snapshot, overrides):
    """The same values, resolved (bench_step.out now follows paths.bench_dir as the other
    benchmarks' outputs do; by default it is the same folder), except that a benchmark's
    section is there in its own mode only (conf/mode/): null in every other mode."""
    from omegaconf import OmegaConf

    before = yaml.safe_load((DATA / "cfg_job_v2" / f"{snapshot}.yaml").read_text())
    now = _job(overrides)
    if now.get("bench_circuit"):  # its noise cases: new, none by default
        _pop_noise_cases(now["bench_circuit"])
    for section in ("bench_circuit", "bench_step", "bench_data", "bench_features"):
        assert section in before  # then: every mode carried every benchmark's settings
        if now["mode"] != section:
            assert now.pop(section) is None
            del before[section]
    assert now.pop("study") is None  # a new key: null selects data's study, as before
    # the settings of mode=predict and mode=export: new keys, there in their own mode only
    assert now.pop("predict") is None and now.pop("export") is None
    assert now.pop("robustness") is None  # mode=robustness's settings, likewise
    # knobs added since, at the defaults that keep the old behaviour: one device, and a
    # second process on a busy run directory refused rather than kept waiting
    assert now["train"].pop("devices") == 1
    assert now["train"].pop("wait_for_lock") is False
    # one process (several: jax.distributed, coordinator and index from the environment)
    assert now["train"].pop("processes") == 1
    assert now["train"].pop("coordinator") is None and now["train"].pop("process_id") is None
    assert now["train"].pop("coordinator_timeout_s") == 300
    # shots and noise on every circuit (docs/noise.md): new knobs, at exact expectation values
    for circuit in (now["head"], now["model"]["circuit"]):
        assert (circuit.pop("shots"), circuit.pop("gradient")) == (None, "adjoint")
        assert circuit.pop("noise") == EXACT_NOISE
        # a PennyLane device in place of qtl's simulator: none (docs/noise.md)
        assert circuit.pop("device") == {"name": None, "options": {}}
    # data=medmnist no longer writes a synthetic set when the file is missing: the presets
    # that want the synthetic stand-in say so (demo_qvit, debug=tiny_medmnist), the study's
    # real-data preset reads real files only
    if snapshot == "qvit":
        assert now["data"]["synthetic"] is False
        now["data"]["synthetic"] = True
    resolved = OmegaConf.to_container(OmegaConf.create(now), resolve=True)
    then = OmegaConf.to_container(OmegaConf.create(before), resolve=True)
    for cfg in (resolved, then):  # ./bench/step.json now, bench/step.json then: one file
        if "bench_step" in cfg:
            cfg["bench_step"]["out"] = os.path.normpath(cfg["bench_step"]["out"])
    assert resolved == then


@pytest.mark.parametrize("section", ["bench_circuit", "bench_step", "bench_data", "bench_features"])
def test_a_benchmarks_settings_in_its_own_mode_are_the_ones_every_mode_showed_before(section):
    from omegaconf import OmegaConf

    before = yaml.safe_load((DATA / "cfg_job_v2" / "default.yaml").read_text())
    now = _job([f"mode={section}"])
    assert now["mode"] == section
    if section == "bench_circuit":
        _pop_noise_cases(now[section])
    resolved = OmegaConf.to_container(OmegaConf.create(now), resolve=True)
    then = OmegaConf.to_container(OmegaConf.create(before), resolve=True)
    if section == "bench_step":  # ./bench/step.json now, bench/step.json then: one file
        for cfg in (resolved, then):
            cfg[section]["out"] = os.path.normpath(cfg[section]["out"])
    assert resolved[section] == then[section]
