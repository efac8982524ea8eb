"""Data: the class taxonomy, curated YOLO datasets, train/replay splits, the frame store,
camera replay and DVC dataset versions."""
