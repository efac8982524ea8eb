"""``roadloop annotate``: open the review dataset in the FiftyOne App on localhost.

Annotators correct ``ground_truth`` (pre-filled from the model's ``predictions``) in the
saved view ``to review`` (or ``reviewed``, ``label issues``, ``batch_<id>``) and tag each
finished sample ``reviewed``; the ``reviews_finished_sensor`` imports them.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import typer

from roadloop.labeling.review_dataset import VIEW_QUEUE, app_url
from roadloop.labeling.review_store import ReviewStore
from roadloop.settings import get_settings

logger = logging.getLogger(__name__)


def review_store() -> ReviewStore:
    """The review store the Dagster resource uses by default (``<home>/fiftyone``), bound to
    the review export the assets use (``<artifacts>/reviewed_labels/export``): a missing
    review dataset is an error while that export holds imported frames, never a new empty
    dataset that would queue every reviewed frame again (``ReviewStore.guarded_by``)."""
    settings = get_settings()
    export = Path(settings.artifacts_dir) / "reviewed_labels" / "export"
    return ReviewStore(database_dir=settings.home / "fiftyone").guarded_by(export)


def annotate(
    port: int = typer.Option(None, help="App port (default: settings.fiftyone_port, 5151)."),
    view: str = typer.Option(
        VIEW_QUEUE, help="Saved view to open: 'to review', reviewed, 'label issues', batch_<id>."
    ),
    address: str = typer.Option("127.0.0.1", help="Interface to serve on (loopback by default)."),
    simulate: int = typer.Option(
        0, help="SIMULATION: let the oracle review this many queued frames first (demo only)."
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Keep serving until Ctrl-C."),
) -> None:
    """Launch the FiftyOne App on the active-learning review queue and print its URL."""
    port = port or get_settings().fiftyone_port
    store = review_store()
    dataset = store.dataset()
    if simulate:
        from roadloop.labeling.oracle import SimulatedAnnotator, simulate_reviews

        done = simulate_reviews(store, SimulatedAnnotator(store.taxonomy), simulate)
        typer.echo(f"SIMULATED annotator (oracle) reviewed {len(done)} frames")
    counts = store.counts()
    saved = dataset.list_saved_views()
    if view not in saved:
        raise typer.BadParameter(
            f"no saved view {view!r}; choose one of {saved}", param_hint="--view"
        )

    fo = store.fo()
    session = fo.launch_app(
        dataset,
        view=dataset.load_saved_view(view),
        port=port,
        address=address,
        remote=True,
        auto=False,
    )
    url = app_url(store.dataset_name, port, address=address, view=view)
    typer.echo(
        f"FiftyOne App: {url}\n"
        f"  {counts.get('samples', 0)} samples, {len(store.queue_items())} waiting for review, "
        f"{counts.get('pending', 0)} reviewed and waiting for import.\n"
        "  Correct `ground_truth`, then tag finished samples `reviewed`."
    )
    if not wait:
        return

    def _stop(signum, frame):  # SIGTERM (e.g. from a process manager) stops like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping the App")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if hasattr(session, "close"):
            session.close()


if __name__ == "__main__":  # python -m launch.annotate
    typer.run(annotate)
