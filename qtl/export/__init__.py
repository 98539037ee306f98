"""A trained model outside its run: predict with it (:mod:`.predictor`), write it as a
self-contained folder (:mod:`.write`) and load that folder back (:mod:`.load`).

An export folder holds ``model.safetensors`` (every weight under its flattened module path,
e.g. ``backbone.stem.conv.kernel``), ``config.json`` (the run's config), ``labels.json``,
``preprocessing.json``, ``metrics.json``, ``provenance.json``, ``export.json`` (format,
version, study, the weights' sha256) and a model card ``README.md``.
"""
