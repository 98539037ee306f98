"""Config composition and validation: typos fail at start with the valid choices."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose, launch

from qtl.config import ConfigError, HeadName, validate
from qtl.labels import CXR8, CXR14, CXR19


@pytest.mark.parametrize("task,labels", [("cxr8", CXR8), ("cxr14", CXR14), ("cxr19", CXR19)])
def test_task_label_lists(task, labels):
    cfg = compose(f"task={task}")
    assert tuple(cfg.task.labels) == labels
    validate(cfg)


def test_paper_preset_is_the_study_setting():
    cfg = compose("experiment=paper")
    assert cfg.backbone.name == "resnet50" and cfg.backbone.pretrained == "microsoft/resnet-50"
    assert not cfg.backbone.freeze and cfg.backbone.batch_norm.value == "inference"
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("adam", 1e-4, 32)
    assert (cfg.train.max_epochs, cfg.train.patience) == (50, 5)
    assert (cfg.data.resize, cfg.data.crop) == (256, 224)
    assert (cfg.data.hflip_p, cfg.data.max_rotation_deg) == (0.5, 15.0)
    assert cfg.head.depth == 3 and cfg.head.theta_init.value == "normal"
    assert cfg.train.backbone_lr is None
    # the study's circuit; simulated by qtl's fast simulator, proven equal in test_fast_sim.py
    assert (cfg.head.entangler.value, cfg.head.rotation.value) == ("ring", "ry")
    assert cfg.head.simulator.value == "fast"


def test_demo_preset_is_transfer_learning():
    cfg = compose("experiment=demo")
    assert cfg.backbone.pretrained == "synthetic" and cfg.backbone.batch_norm.value == "inference"
    assert cfg.train.backbone_lr < cfg.train.lr


def test_head_choice_is_typed():
    assert compose("head=cdl").head.name is HeadName.cdl


@pytest.mark.parametrize(
    "override,expected",
    [
        ("head=foo", "Available options in 'head'"),
        ("task=cxr99", "Available options in 'task'"),
        ("head.simulator=nope", "expected one of"),
        ("train.lerning_rate=1", "not in 'TrainConfig'"),
    ],
)
def test_typos_fail_at_compose_with_choices(override, expected, tmp_path):
    proc = launch("--cfg", "job", override, cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout


def test_cross_field_validation_messages():
    with pytest.raises(ConfigError, match="data.crop=300 is larger than data.resize"):
        validate(compose("data.crop=300"))
    with pytest.raises(ConfigError, match="unknown label.*Valid NIH-CXR-LT labels"):
        validate(compose("task.labels=[Atelectasis,Pneumonitis]"))
    with pytest.raises(ConfigError, match="data.root is not set.*data=synthetic"):
        validate(compose("data=nih_cxr_lt", "data.root=null"))


def test_cfg_job_shows_composed_config(tmp_path):
    proc = launch("--cfg", "job", "task=cxr14", "head=cdl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: cxr14" in proc.stdout and "Hernia" in proc.stdout
    assert (ROOT / "conf" / "config.yaml").exists()


def test_every_mode_has_its_config_and_only_a_benchmark_carries_benchmark_settings():
    """mode is a config group (conf/mode/): a Mode without its file could not be chosen."""
    from qtl.config import Mode

    assert {p.stem for p in (ROOT / "conf" / "mode").glob("*.yaml")} == {m.value for m in Mode}
    benches = ("bench_circuit", "bench_step", "bench_data", "bench_features")
    for mode in Mode:
        cfg = compose(f"mode={mode.value}")
        assert cfg.mode == mode
        assert [b for b in benches if getattr(cfg, b) is not None] == (
            [mode.value] if mode.value in benches else []
        )
    cfg = compose("mode=bench_circuit", "bench_circuit.qubits=[14,19]")
    assert cfg.bench_circuit.qubits == [14, 19] and cfg.bench_circuit.out.endswith("circuit.json")
