"""mode=robustness on a tiny sweep of two finished runs (a DQC head and a CDL head, one epoch
each, trained here once): the exact point reproduces the run's recorded test AUROC, shots and
depolarizing noise change it, the CDL run is a flat line, the table and figure are written and
a report picks the table up; bad grid values are one-line input errors naming the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY, compose

from qtl.apps import one_line
from qtl.apps.robustness import main as robustness_main
from qtl.apps.train import train_and_evaluate
from qtl.report.robustness import append_robustness
from qtl.utils.errors import EXIT_INPUT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(synth_root, tmp_path_factory) -> Path:
    """A sweep-like folder: cxr8-dqc/seed0 and cxr8-cdl/seed0, finished (one epoch each)."""
    root = tmp_path_factory.mktemp("robust-sweep")
    for head in ("dqc", "cdl"):
        # one circuit layer: the noisy points compile a trajectory program per gate
        depth = ["head.depth=1"] if head == "dqc" else []
        cfg = compose(
            *TINY, f"data.root={synth_root}", f"head={head}", "train.max_epochs=1", *depth
        )
        train_and_evaluate(cfg, root / f"cxr8-{head}" / "seed0")
    return root


@pytest.fixture(scope="module")
def table(sweep, tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("robust-out")
    cfg = compose(
        "mode=robustness",
        f"robustness.runs={sweep}",
        "robustness.shots=[20,null]",
        "robustness.depolarizing=[0,0.1]",
        "robustness.trajectories=4",
        f"robustness.out={out}",
    )
    got = robustness_main(cfg, None)
    assert got["failed"] == []
    with (out / "robustness.csv").open(newline="") as f:
        return out, list(csv.DictReader(f))


def _recorded(run: Path) -> float:
    return json.loads((run / "results.json").read_text())["auroc"]["test"]["mean"]


def _rows(rows: list[dict[str, str]], run: Path) -> dict[tuple[str, str], float]:
    return {
        (r["shots"], r["depolarizing"]): float(r["auroc"]) for r in rows if r["run"] == str(run)
    }


def test_dqc_exact_point_is_the_recorded_score_and_noise_moves_it(sweep, table) -> None:
    _, rows = table
    dqc = sweep / "cxr8-dqc" / "seed0"
    got = _rows(rows, dqc)
    assert len(got) == 4  # 2 shots x 2 depolarizing strengths
    exact = got[("exact", "0")]
    assert exact == pytest.approx(_recorded(dqc), abs=1e-5)
    for point in [("20", "0"), ("exact", "0.1"), ("20", "0.1")]:
        assert abs(got[point] - exact) > 1e-6, point
    assert {r["circuit"] for r in rows if r["run"] == str(dqc)} == {"head"}
    assert {r["arm"] for r in rows if r["run"] == str(dqc)} == {"cxr8-dqc"}


def test_cdl_run_is_a_flat_line(sweep, table) -> None:
    _, rows = table
    cdl = sweep / "cxr8-cdl" / "seed0"
    got = _rows(rows, cdl)
    assert len(got) == 4
    assert len(set(got.values())) == 1  # no circuit: every point is the run as trained
    assert next(iter(got.values())) == pytest.approx(_recorded(cdl), abs=1e-5)
    assert {r["circuit"] for r in rows if r["run"] == str(cdl)} == {"none"}


def test_table_figure_and_report_section(table, tmp_path) -> None:
    out, _ = table
    figure = out / "robustness.png"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:4] == b"\x89PNG"
    md = (out / "robustness.md").read_text()
    assert "| cxr8-dqc | 20 | 0.1 |" in md and "| cxr8-cdl | exact | 0 |" in md
    report = out / "report.md"
    report.write_text("# Report\n")
    append_robustness(out, report)
    text = report.read_text()
    assert "## Robustness under shots and noise" in text and "| cxr8-dqc |" in text
    assert "![robustness](robustness.png)" in text
    empty = tmp_path / "report.md"
    empty.write_text("# Report\n")
    append_robustness(tmp_path, empty)  # no robustness.md there: the report is left alone
    assert empty.read_text() == "# Report\n"


@pytest.mark.parametrize(
    "override, field",
    [
        ("robustness.shots=[100,0]", "robustness.shots[1]=0"),
        ("robustness.depolarizing=[0,1.5]", "robustness.depolarizing[1]=1.5"),
        ("robustness.trajectories=0", "robustness.trajectories=0"),
    ],
)
def test_bad_grid_values_exit_2_naming_the_field(override, field, tmp_path) -> None:
    cfg = compose("mode=robustness", f"robustness.runs={tmp_path}", override)
    with pytest.raises(Exception) as err:
        robustness_main(cfg, tmp_path)
    code, line = one_line(err.value) or (None, "")
    assert code == EXIT_INPUT and field in line
    assert not (tmp_path / "robustness.csv").exists()  # refused before any work
