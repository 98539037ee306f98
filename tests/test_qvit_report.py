"""The MedMNIST sweep report: scores per dataset, paired t-tests over seeds, the teachers and
the published anchors, from records written by qtl's own record code."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_results
from scipy import stats

from qtl.record.files import RunFiles


def _sweep(root, rng):
    """Two datasets x {vit, qvit} x {none, joint} x 4 seeds, random test scores."""
    values = {}
    teacher = {
        "checkpoint_sha256": "ab" * 32,
        "model": "resnet18",
        "parameters": 1000,
        "metrics": {"test": {"auc": 0.811, "acc": 0.522}},
    }
    for ds in ("retinamnist", "breastmnist"):
        for model in ("vit", "qvit"):
            for kd in ("none", "joint"):
                for seed in range(4):
                    auc, acc = rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.8)
                    values[(ds, model, kd, seed)] = (auc, acc)
                    res = make_results(
                        run=f"qvit/{ds}-{model}/seed{seed}",
                        task=ds,
                        head=model,
                        seed=seed,
                        labels=["label"],
                        study="medmnist",
                        model=model,
                        dataset=ds,
                        task_type="ordinal",
                        distill=kd,
                        metrics={"test": {"auc": auc, "acc": acc, "auc_undefined": 0}},
                        parameters={"total": 1421 if model == "qvit" else 1437},
                        costs={"total": {"params": 1421, "flops": 526_500}},
                        teacher=teacher if kd != "none" else {},
                    )
                    kd_part = "" if kd == "none" else f"-kd_{kd}"
                    RunFiles(root / f"{ds}-{model}{kd_part}" / f"seed{seed}").write_results(res)
    return values


def test_qvit_report_tests_and_anchors(tmp_path):
    from qtl.config import ReportConfig
    from qtl.report.build import write_report

    values = _sweep(tmp_path / "sweep", np.random.default_rng(0))
    path = write_report(ReportConfig(sweep=str(tmp_path / "sweep")))
    text = path.read_text()
    tests = (path.parent / "tables" / "tests.md").read_text()
    # QViT vs ViT on retinamnist (no KD), AUC: the p of scipy's paired t-test on the same seeds
    q = [values[("retinamnist", "qvit", "none", s)][0] for s in range(4)]
    v = [values[("retinamnist", "vit", "none", s)][0] for s in range(4)]
    p = stats.ttest_rel(q, v).pvalue
    row = next(r for r in tests.splitlines() if "retinamnist | AUC | qvit vs vit (none)" in r)
    assert f"{p:.3g}" in row and f"{np.mean(np.subtract(q, v)):+.3f}" in row
    assert any("breastmnist | ACC | qvit: joint vs none" in r for r in tests.splitlines())
    scores = (path.parent / "tables" / "scores.md").read_text()
    mean, sd = np.mean(q), np.std(q, ddof=1)
    assert f"{mean:.3f} ± {sd:.3f}" in scores
    assert "0.717 / 0.524" in scores and "0.901 / 0.863" in scores  # MedMNIST v2 ResNet-18
    assert "0.863" in text and "0.846" in text  # the paper's headline
    assert "0.811" in text and "resnet18" in text  # the teacher's own test AUC
    assert (path.parent / "figures" / "scores.png").stat().st_size > 0


def test_summary_prints_every_run(tmp_path, capsys):
    from qtl.report.qvit import main

    values = _sweep(tmp_path / "sweep", np.random.default_rng(1))
    main([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    auc, acc = values[("breastmnist", "qvit", "joint", 3)]
    assert f"| breastmnist | qvit | joint | 3 | 1 | {auc:.3f} | {acc:.3f} |" in out
    with pytest.raises(SystemExit, match="no finished MedMNIST runs"):
        main([str(tmp_path / "empty")])


def test_every_results_json_is_read_once(tmp_path, monkeypatch):
    """One pipeline: the report collects the sweep once and every section reads from it."""
    from collections import Counter

    from qtl.config import ReportConfig
    from qtl.report.build import write_report

    _sweep(tmp_path / "sweep", np.random.default_rng(0))
    reads: Counter = Counter()
    original = RunFiles.read_results

    def counting(self):
        reads[self.dir] += 1
        return original(self)

    monkeypatch.setattr(RunFiles, "read_results", counting)
    write_report(ReportConfig(sweep=str(tmp_path / "sweep")))
    assert len(reads) == 32 and set(reads.values()) == {1}
