"""Evaluation: accuracy, count error, latency and robustness of a model in every format,
the HTML/markdown report, and the promotion gates.

Modules: ``results`` (the schema of benchmark results), ``inputs`` (model-file and data-YAML
checks and readers), ``accuracy`` (mAP, P/R/F1, count MAE), ``latency`` (forward-pass
percentiles), ``testsets`` (per-source test sets, robustness slices), ``benchmark`` (runs them
all), ``report`` and ``gates``. Nothing is re-exported here, so importing the package is free.
"""
