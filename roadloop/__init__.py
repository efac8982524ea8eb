"""roadloop: the framework-free library of the platform, grouped by concern.

``settings``, ``errors`` and ``fsutil`` serve all of it; ``data``, ``models``, ``evaluation``,
``labeling`` and ``release`` hold the logic. Nothing here imports Dagster, the gateway
(``fleet``) or the code location (``assets``, ``resources``, ...): those import this.
"""
