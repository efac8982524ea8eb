"""Evaluation: accuracy, count error, latency and robustness of a model in every format,
the HTML/markdown report, and the promotion gates."""
