"""The Flower app that trains the detector across camera sites (``flwr run`` this repo).

``server_app`` and ``client_app`` are thin over ``roadloop.federation``; the app's run
config lives in the repository's ``pyproject.toml`` (``[tool.flwr.app]``).
"""

from pathlib import Path

# The Flower app's directory: the one whose pyproject.toml has [tool.flwr.app].
APP_DIR = Path(__file__).resolve().parents[1]
