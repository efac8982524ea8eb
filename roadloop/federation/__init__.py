"""Federated training across camera sites whose frames may not leave them.

Framework-free pieces the Flower app (``federated/``) and the Dagster asset share: the
federation's configuration, screening of site updates, privacy accounting, site selection,
local training on a site's frames, and a local deployment (SuperLink + SuperNodes as real
processes on loopback). Nothing here imports Dagster; ``flwr`` is only started as processes.
"""
