"""experiment=search: the Optuna study continues after a kill, the objective comes from the
run records, diverged/failed trials do not break the study, and the search report."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose, launch
from helpers import make_results, read_results

SEARCH = ["experiment=search", *TINY]  # the search preset at debug=tiny size


def _trials(db: Path) -> list[tuple[int, str]]:
    """(number, state) per trial, read with sqlite3 as another process sees the storage."""
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=30)) as con:
        try:
            return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
        except sqlite3.OperationalError:  # the study's tables are still being created
            return []


def _study(folder: Path):
    import optuna

    info = json.loads((folder / "search.json").read_text())
    return optuna.load_study(study_name=info["study_name"], storage=f"sqlite:///{folder}/optuna.db")


def _epochs(run_dir: Path) -> list[int]:
    return [
        json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


# -- config and objective (fast) ------------------------------------------------------------
def test_search_preset_composes_with_demo():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from qtl.studies import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config",
            overrides=["experiment=[demo,search]", "task=cxr19", "head=dqc"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.qtl_optuna.optuna_sweeper.QtlOptunaSweeper"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "trial${hydra.job.num}"
    assert cfg.backbone.name == "resnet_small" and cfg.name == "search"  # demo's model kept
    searched = {"train.lr", "train.backbone_lr", "head.depth", "head.theta_init",
                "head.entangler", "head.rotation"}  # fmt: skip
    assert set(sweeper.params) == searched
    assert "log" in sweeper.params["train.lr"]


def test_search_objective_and_direction():
    from qtl.config import SearchObjective

    assert compose("experiment=search").search.objective == SearchObjective.val_loss
    cfg = compose("experiment=search", "search.objective=val_auroc")
    assert cfg.search.direction == "maximize"
    assert compose("experiment=search").search.direction == "minimize"
    with pytest.raises(Exception, match="val_los"):  # a misspelt objective fails at compose
        compose("search.objective=val_los")


def test_objective_of_a_run_without_a_usable_record(tmp_path):
    from qtl.sweep.objective import diverged, objective_value, read_objective

    assert math.isnan(read_objective(tmp_path, "val_loss"))  # no results.json: failed run
    (tmp_path / "results.json").write_text("{not json")  # a half-written file
    assert math.isnan(read_objective(tmp_path, "val_loss"))
    # json.dumps writes an infinite best loss as Infinity: a run that never improved
    (tmp_path / "results.json").write_text(json.dumps({"best_val_loss": math.inf}))
    assert math.isnan(read_objective(tmp_path, "val_loss"))
    no_auc = make_results(auroc={"val": {"mean": None, "per_label": {}}})
    assert math.isnan(objective_value(no_auc, "val_auroc"))
    assert objective_value(make_results(best_val_loss=0.25), "val_loss") == 0.25
    assert not diverged(tmp_path)
    from qtl.record.files import EpochRow, RunFiles

    row = dict(step=1, val_mean_auroc=0.5, best=True, seconds=1.0)
    RunFiles(tmp_path).write_metrics(
        [
            EpochRow(epoch=1, train_loss=0.7, val_loss=0.7, **row),
            EpochRow(epoch=2, train_loss=math.inf, val_loss=math.nan, **row),
        ]
    )
    assert diverged(tmp_path)
    assert diverged(None, "ValueError: Input contains NaN.")


def test_only_when_and_best_command_helpers():
    from omegaconf import OmegaConf

    from hydra_plugins.qtl_optuna._impl import SearchError, _holds
    from qtl.report.search import _without_search_preset

    cfg = OmegaConf.create({"head": {"name": "cdl"}, "backbone": {"freeze": False}})
    assert not _holds(cfg, "head.name=dqc", "head.depth")
    assert _holds(cfg, "backbone.freeze=false", "train.backbone_lr")
    assert _holds(cfg, "head.name!=dqc", "x")
    with pytest.raises(SearchError, match="not a config key"):
        _holds(cfg, "head.nme=dqc", "head.depth")
    assert _without_search_preset("experiment=search") is None
    assert _without_search_preset("experiment=[demo,search]") == "experiment=demo"
    assert _without_search_preset("task=cxr8") == "task=cxr8"


def test_search_space_from_the_preset_on_current_optuna():
    """The preset's override grammar maps to Optuna >= 4 distributions; trials draw from them."""
    import optuna
    from omegaconf import OmegaConf
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.qtl_optuna._space import describe, grid_choices, parse

    preset = OmegaConf.load(ROOT / "conf/experiment/search.yaml").hydra.sweeper.params
    args = [f"{k}={v}" for k, v in preset.items()] + ["train.epochs=3", "head.width=range(2,8,2)"]
    space, fixed = parse(args)
    assert fixed == {"train.epochs": "3"}
    assert space["train.lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["head.depth"] == IntDistribution(1, 6)
    assert space["head.entangler"] == CategoricalDistribution(["ring", "chain", "even_odd"])
    assert space["head.width"] == IntDistribution(2, 8, step=2)
    assert describe(space["train.lr"]) == "log-uniform [1e-05, 0.01]"
    assert describe(space["head.depth"]) == "int uniform [1, 6]"
    assert grid_choices("head.width", space["head.width"]) == [2, 4, 6, 8]
    assert grid_choices("head.rotation", space["head.rotation"]) == ["ry", "rx", "rz_ry"]
    with pytest.raises(ValueError, match="GridSampler needs discrete values"):
        grid_choices("train.lr", space["train.lr"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    from hydra_plugins.qtl_optuna._impl import QtlOptunaSweeperImpl

    sweeper = QtlOptunaSweeperImpl(
        sampler=OmegaConf.create({}), direction=None, storage=None, study_name=None,
        n_trials=1, n_jobs=1, max_failure_rate=0.0, params=None, only_when=None,
    )  # fmt: skip
    (overrides,) = sweeper._configure_trials([study.ask()], space, fixed)
    drawn = dict(o.split("=", 1) for o in overrides)
    assert set(drawn) == {*space, "train.epochs"} and drawn["train.epochs"] == "3"
    assert 1e-5 <= float(drawn["train.lr"]) <= 1e-2
    assert drawn["head.entangler"] in {"ring", "chain", "even_odd"}
    assert int(drawn["head.depth"]) in range(1, 7)


# -- end to end (slow) ----------------------------------------------------------------------
def _search_cmd(folder: Path, *extra: str) -> list[str]:
    return ["-m", *SEARCH, "head=dqc", f"hydra.sweep.dir={folder}", *extra]


def _second_search(folder: Path) -> Exception | None:
    """What a second search on the same folder meets (in this process: no extra start-up)."""
    from omegaconf import OmegaConf

    from hydra_plugins.qtl_optuna._impl import QtlOptunaSweeperImpl

    other = QtlOptunaSweeperImpl(
        sampler=OmegaConf.create({}), direction=None, storage=None, study_name=None,
        n_trials=1, n_jobs=1, max_failure_rate=0.0, params=None, only_when=None,
    )  # fmt: skip
    try:
        other._lock(folder)
    except Exception as err:  # noqa: BLE001 - the test asserts which error it was
        return err
    return None


@pytest.fixture(scope="module")
def killed_search(_session_workdir, tmp_path_factory):
    """A 4-trial search SIGKILLed after 2 trials ended, then the same command again."""
    folder = tmp_path_factory.mktemp("search") / "cxr8-dqc"
    args = _search_cmd(folder, "hydra.sweeper.n_trials=4")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=_session_workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    db = folder / "optuna.db"
    second: Exception | None = None
    try:
        while True:
            assert proc.poll() is None, "the search ended before it was killed:\n" + (
                proc.stdout.read() if proc.stdout else ""
            )
            rows = _trials(db)
            if second is None and rows:  # the study exists: a second search must be refused
                second = _second_search(folder)
            running = [n for n, state in rows if state == "RUNNING"]
            done = sum(state == "COMPLETE" for _, state in rows)
            # 2 trials done and the next one's job under way in its run directory
            if done >= 2 and running and (folder / f"trial{running[0]}/run_config.json").exists():
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = _trials(db)
    params_at_kill = {t.number: t.params for t in _study(folder).trials}
    finished = {
        n: (folder / f"trial{n}" / "results.json").stat().st_mtime_ns
        for n, state in killed_at
        if state == "COMPLETE"
    }
    t1 = time.perf_counter()
    rerun = launch(*args, cwd=_session_workdir, timeout=600)
    t2 = time.perf_counter()
    jobs = [json.loads(p.read_text()) for p in sorted((folder / ".sweep_jobs").glob("*.json"))]
    again = launch(*args, cwd=_session_workdir, timeout=300)  # a finished search: nothing to do
    print(f"search: killed after {t1 - t0:.0f} s at {killed_at}, continued in {t2 - t1:.0f} s")
    return {
        "folder": folder, "killed_at": killed_at, "finished": finished, "second": second,
        "rerun": rerun, "jobs": jobs, "again": again, "params_at_kill": params_at_kill,
    }  # fmt: skip


@pytest.mark.slow
def test_search_killed_and_continued(killed_search):
    s = killed_search
    folder = s["folder"]
    assert "another search is running" in str(s["second"])
    assert s["rerun"].returncode == 0, s["rerun"].stderr[-3000:]
    study = _study(folder)
    states = [(t.number, t.state.name) for t in study.trials]
    assert states == [(n, "COMPLETE") for n in range(4)], (states, s["killed_at"])
    # killed with one trial running: continued under its number, with its parameters
    (interrupted,) = [n for n, state in s["killed_at"] if state == "RUNNING"]
    assert study.trials[interrupted].params == s["params_at_kill"][interrupted]
    # the rerun launched only what the kill left unfinished, under the trials' own numbers
    left = sorted(n for n in range(4) if n not in s["finished"])
    assert interrupted in left and len(s["finished"]) >= 2
    assert sorted(j["num"] for j in s["jobs"]) == left
    for n, mtime in s["finished"].items():  # trials done before the kill were not touched
        assert (folder / f"trial{n}" / "results.json").stat().st_mtime_ns == mtime
    for t in study.trials:  # one directory per trial, trained once, objective from its record
        run_dir = folder / f"trial{t.number}"
        assert t.user_attrs["qtl_run_dir"] == f"trial{t.number}"
        assert _epochs(run_dir) == [1, 2]
        results = read_results(run_dir)
        assert t.value == pytest.approx(results["best_val_loss"])
        losses = [
            json.loads(x)["val_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert t.value == pytest.approx(min(losses))
        assert t.params["head.depth"] == results["config"]["head"]["depth"]
        assert t.params["train.lr"] == pytest.approx(results["config"]["train"]["lr"])
    # a resumed sampler does not replay the first trials' draws
    lrs = [t.params["train.lr"] for t in study.trials]
    assert len(set(lrs)) == 4, lrs
    # the same command on a finished search trains nothing and adds no trial
    assert s["again"].returncode == 0, s["again"].stderr[-3000:]
    assert "0 new" in s["again"].stderr + s["again"].stdout
    assert len(_study(folder).trials) == 4


@pytest.mark.slow
def test_search_report(killed_search):
    from qtl.config import ReportConfig
    from qtl.report import write_report

    folder = killed_search["folder"]
    assert (folder / "report" / "report.md").exists()  # written when the search ended
    out = folder / "report2"
    path = write_report(ReportConfig(sweep=str(folder), out=str(out)))
    assert path == out / "report.md"
    study = _study(folder)
    best = study.best_trial
    rows = (out / "tables" / "trials.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 1 + 4
    for name in best.params:
        assert f"param:{name}" in header
        assert (out / "figures" / f"param_{name}.png").stat().st_size > 1000
    assert (out / "figures" / "objective.png").stat().st_size > 1000
    assert (out / "tables" / "trials.md").exists()
    text = path.read_text()
    assert f"Trial {best.number}: val_loss = {best.value:.4f}" in text
    # the best command is ready to run: it composes to the best trial's config
    command = (out / "best_command.txt").read_text().splitlines()[0]
    assert command in text
    argv = shlex.split(command)
    assert argv[:2] == ["python", "launch.py"] and "debug=tiny" in argv
    cfg = compose(*argv[2:])
    assert cfg.head.depth == best.params["head.depth"]
    assert cfg.head.entangler.value == best.params["head.entangler"]
    assert cfg.train.lr == pytest.approx(best.params["train.lr"])
    assert cfg.train.backbone_lr == pytest.approx(best.params["train.backbone_lr"])
    assert cfg.backbone.hidden_sizes == [8, 16] and cfg.name.endswith("-best")


@pytest.mark.slow
def test_search_on_the_gpu_pool_by_val_auroc(_session_workdir, tmp_path):
    """Two trials at once on the workstation launcher (CPU slots); head=cdl searches lr only."""
    folder = tmp_path / "cxr8-cdl"
    res = launch(
        "-m", *SEARCH, "head=cdl", f"hydra.sweep.dir={folder}", "search.objective=val_auroc",
        "hydra/launcher=workstation", "hydra.launcher.gpus=[]", "hydra.launcher.cpu_jobs=2",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
        cwd=_session_workdir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Not searched for this run: head.depth" in res.stderr + res.stdout
    study = _study(folder)
    assert study.direction.name == "MAXIMIZE"
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert set(t.params) == {"train.lr", "train.backbone_lr"}  # only_when: dqc knobs left out
        results = read_results(folder / f"trial{t.number}")
        assert t.value == pytest.approx(results["auroc"]["val"]["mean"])
        assert (folder / ".gpu_pool" / f"job{t.number}.log").exists()
        assert t.user_attrs["qtl_run_dir"] == f"trial{t.number}"  # the job's folder came back


@pytest.mark.slow
def test_search_with_diverged_and_failed_trials(_session_workdir, tmp_path):
    """A diverged trial is pruned and the search goes on; a crashed one stops it as configured."""
    diverging = tmp_path / "diverging"
    res = launch(
        "-m", *SEARCH, "head=cdl", f"hydra.sweep.dir={diverging}", "hydra.sweeper.n_trials=1",
        "train.lr=1e38", "hydra.sweeper.max_failure_rate=0",  # backbone_lr is searched
        cwd=_session_workdir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (trial,) = _study(diverging).trials
    assert trial.state.name == "PRUNED" and trial.user_attrs["qtl_outcome"] == "diverged"
    report = (diverging / "report" / "report.md").read_text()
    assert "No trial completed yet." in report and "diverged" in report

    failing = tmp_path / "failing"
    res = launch(
        "-m", *SEARCH, "head=cdl", f"hydra.sweep.dir={failing}", "hydra.sweeper.n_trials=3",
        "train.patience=0", "hydra.sweeper.max_failure_rate=0.34",
        cwd=_session_workdir,
    )  # fmt: skip
    assert res.returncode != 0
    states = _trials(failing / "optuna.db")
    assert states == [(0, "FAIL"), (1, "FAIL")]  # 2 > 0.34 x 3 allowed: stopped, none left running
    for t in _study(failing).trials:
        assert "train.patience=0 is out of range" in t.user_attrs["qtl_error"]
