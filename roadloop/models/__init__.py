"""Models: Ultralytics training, ONNX export, INT8 quantization and the MLflow registry
(runs, versions, the ``candidate``/``production`` aliases)."""
