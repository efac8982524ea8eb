"""Labeling: frame embeddings, the active-learning queue, label-quality checks (cleanlab),
the FiftyOne review store, and a simulated annotator for tests and benchmarks."""
