"""Entry points: the ``roadloop`` command line (``launch.cli``), the demo orchestration
(``launch.demo``), the annotate command and the local-fleet harness that starts a gateway and
agents as processes. Only tests and benchmarks import this package: it sits above the Dagster
code location, ``fleet`` and ``roadloop``, and may import all of them."""
