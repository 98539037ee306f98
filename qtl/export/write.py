"""``mode=export``'s work: a finished run's best weights and what a reader needs to use them
- the config, the label list, the preprocessing, the metrics and provenance from results.json
and a model card - in one new folder (written under a temporary name and renamed, so a
folder that exists is complete)."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qtl import __version__
from qtl.config import PathsConfig
from qtl.export.load import (
    CARD,
    CONFIG,
    FORMAT,
    LABELS,
    MANIFEST,
    METRICS,
    PREPROCESSING,
    PROVENANCE,
    VERSION,
    WEIGHTS,
    ExportError,
    sha256,
)
from qtl.export.predictor import Predictor, finished_run, load_run
from qtl.utils.files import atomic_write_text


def readable_mode() -> int:
    """The mode a plain new file gets under this process's umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_export(run_dir: Path | str, out: Path | str, paths: PathsConfig | None = None) -> Path:
    """Export the finished run in ``run_dir`` to the folder ``out`` (new, or empty)."""
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"export.out={out} exists and is not empty: name a new folder (nothing was written)"
        )
    results = finished_run(run_dir)
    predictor = load_run(run_dir, paths)
    return write_folder(out, results, predictor, run_dir)


def write_folder(out: Path, results: Any, predictor: Predictor, run_dir: Path) -> Path:
    """The export folder of ``predictor`` (the run's model with its best weights) and the
    run's ``results``; written under a temporary name, then renamed to ``out``."""
    from safetensors.numpy import save_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        source = "synthetic" if results.synthetic else "real"
        save_file(
            predictor.weights(), str(tmp / WEIGHTS), metadata={"format": FORMAT, "run": results.run}
        )
        _dump(tmp / CONFIG, results.config)
        _dump(
            tmp / LABELS,
            {
                "outputs": predictor.outputs,
                "descriptions": predictor.descriptions,
                "task": predictor.task,
            },
        )
        _dump(tmp / PREPROCESSING, predictor.preprocessing)
        metrics = {
            "auroc": {
                s: {"mean": a.mean, "per_label": a.per_label} for s, a in results.auroc.items()
            },
            "metrics": results.metrics,
            "loss": results.loss,
            "best_epoch": results.best_epoch,
            "epochs": results.epochs,
            "best_val_loss": results.best_val_loss,
            "split_sizes": results.split_sizes,
        }
        _dump(tmp / METRICS, metrics)
        provenance = {
            "run": results.run,
            "run_dir": str(run_dir.resolve()),
            "study": results.study,
            "label": results.label,
            "seed": results.seed,
            "fingerprint": results.fingerprint,
            "data_source": source,
            "weights_from": f"checkpoints/best/{results.best_epoch}",
            "provenance": results.provenance,
            "hardware": results.hardware,
            "parameters": results.parameters,
            "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "qtl_version": __version__,
        }
        _dump(tmp / PROVENANCE, provenance)
        _dump(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "version": VERSION,
                "study": results.study,
                "data_source": source,
                "weights": WEIGHTS,
                "weights_sha256": sha256(tmp / WEIGHTS),
                "files": [WEIGHTS, CONFIG, LABELS, PREPROCESSING, METRICS, PROVENANCE, CARD],
            },
        )
        atomic_write_text(tmp / CARD, model_card(results, predictor, source))
        readable = readable_mode()
        for f in tmp.iterdir():  # to be handed on: as readable as the umask lets new files be
            f.chmod(readable)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _scores(results: Any) -> list[str]:
    rows = ["| split | metric | value |", "|---|---|---|"]
    for split, block in results.auroc.items():
        if block.mean is not None:
            rows.append(
                f"| {split} | mean AUROC over {len(block.per_label)} labels | {block.mean:.3f} |"
            )
    for split, m in results.metrics.items():
        for key in ("auc", "acc"):
            if m.get(key) is not None:
                rows.append(f"| {split} | {key.upper()} | {m[key]:.3f} |")
    return rows if len(rows) > 2 else ["(no test metrics recorded)"]


def _circuit_sentence(circuit: dict[str, Any] | None, noise: dict[str, Any]) -> str:
    """How the model's circuits were run, from the record (exact, shots/noise, a device)."""
    if circuit is None:
        return "A classical model (no quantum circuit)."
    device = (noise.get("device") or {}).get("name")
    if device:
        return (
            f"The quantum circuits were run on the PennyLane device `{device}` (settings in "
            "results.json, `quantum_noise`); a real device's results may differ from it."
        )
    where = f"a classical simulator (`{circuit.get('simulator')}`)"
    if noise and not noise.get("exact", True):
        return (
            f"The quantum circuits were run on {where} with finite shots and/or noise models "
            "(settings in results.json, `quantum_noise`), not on quantum hardware."
        )
    return (
        f"The quantum circuits were run on {where}: an exact state vector, no shot noise or "
        "hardware noise, not quantum hardware."
    )


def model_card(results: Any, predictor: Predictor, source: str) -> str:
    """README.md of the export: what the model is, what it was trained on (synthetic or real,
    said first), its metrics, how to use it and its limits."""
    from qtl.studies import get as get_study

    data = results.config.get("data", {})
    facts = get_study(results.study).card_facts(results, predictor.outputs, predictor.task)
    what, dataset = facts.what, facts.dataset
    if source == "synthetic":
        trained = (
            "> **Trained on SYNTHETIC data.** This model was trained and tested on qtl's built-in "
            "synthetic stand-in images, not on medical images: it shows that the pipeline runs "
            "and says nothing about performance on real images."
        )
    else:
        trained = f"> **Trained on real data**: {dataset} ({data.get('name')})."
    quantum = _circuit_sentence(facts.circuit, results.quantum_noise or {})
    sizes = ", ".join(f"{k} {v}" for k, v in results.split_sizes.items())
    lines = [
        f"# qtl model: {results.label or results.run} (seed {results.seed})",
        "",
        trained,
        "",
        f"- Model: {what}; {results.parameters.get('total', '?'):,} parameters."
        if isinstance(results.parameters.get("total"), int)
        else f"- Model: {what}.",
        f"- Study: `{results.study}`; run `{results.run}`; best epoch {results.best_epoch} of "
        f"{results.epochs}; images per split: {sizes or '?'}.",
        f"- Outputs ({predictor.task}), one probability each: "
        + ", ".join(
            f"`{o}` ({d})" if o != d else f"`{o}`"
            for o, d in zip(predictor.outputs, predictor.descriptions, strict=False)
        ),  # fmt: skip
        f"- Preprocessing: `{PREPROCESSING}` ({predictor.preprocessing.get('model_input')}).",
        "",
        "## Metrics (from the run's results.json)",
        "",
        *_scores(results),
        "",
        "## Use",
        "",
        "```bash",
        "python launch.py mode=predict predict.run_dir=<this folder> "
        "predict.images=<folder or CSV>",
        "```",
        "",
        "```python",
        "from qtl.export.load import load_export",
        "from qtl.data.images import read_image",
        "model = load_export('<this folder>')",
        "x = read_image('image.png', model.preprocessing)[None]  # a batch of one",
        "probs = model.predict(x)  # columns: model.outputs",
        "```",
        "",
        "## Limits",
        "",
        "- A research model: **not for clinical use**, not validated for diagnosis.",
        f"- {quantum}",
        "- Trained on one dataset and one seed; scores on other hospitals' or devices' images "
        "are unknown. See `metrics.json` and `provenance.json` for the full record.",
        "",
        f"Files: `{WEIGHTS}` (weights by module path), `{CONFIG}`, `{LABELS}`, "
        f"`{PREPROCESSING}`, `{METRICS}`, `{PROVENANCE}`, `{MANIFEST}`. Exported by qtl "
        f"{__version__}.",
        "",
    ]
    return "\n".join(lines)
