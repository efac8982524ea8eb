"""GPU serving: one ONNX graph that letterboxes, detects and suppresses on the device
(:mod:`roadloop.serving.graph`), and a batcher that runs it for many cameras at once
(:mod:`roadloop.serving.batched`). See ``docs/gpu.md``."""
