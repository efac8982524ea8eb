"""A user's mistake on a command line is one ``error:`` line and exit code 2, not a traceback.

Shared by the ``roadloop`` command (``launch.cli``) and ``python -m fleet`` (``fleet.cli``):
both may import ``roadloop``, and neither imports the other's package here (``roadloop
settings`` must not load the gateway).
"""

from __future__ import annotations

import os

import click
from typer.core import TyperGroup

# Settings classes and the prefix of the environment variables that set their fields.
_ENV_PREFIXES = {"Settings": "ROADLOOP_", "GatewaySettings": "ROADLOOP_GATEWAY_"}


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an exception that is the user's input, not a bug (None)."""
    from pydantic import ValidationError

    from roadloop.errors import RoadloopError

    if isinstance(exc, ValidationError):
        prefix = _ENV_PREFIXES.get(exc.title)
        parts = []
        for err in exc.errors()[:3]:
            field = ".".join(str(p) for p in err.get("loc", ()))
            where = f"{field} ({prefix}{field.upper()})" if prefix and field else field
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return f"invalid {exc.title}: " + "; ".join(parts)
    if isinstance(exc, (RoadloopError, OSError, ValueError, OverflowError)):
        return str(exc) or type(exc).__name__
    if type(exc).__module__.split(".")[0] in ("sqlalchemy", "pydantic_settings"):
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


class UserErrorGroup(TyperGroup):
    """A Typer group (``typer.Typer(cls=UserErrorGroup)``) whose commands end a user's mistake
    (bad settings, a bad path, a refused input: ``user_error``) with one ``error:`` line and
    exit code 2; ``ROADLOOP_DEBUG=1`` shows the traceback. Anything else is a bug: raised."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            message = user_error(exc)
            if message is None or os.environ.get("ROADLOOP_DEBUG"):
                raise
            click.echo(f"error: {message}", err=True)
            raise click.exceptions.Exit(2) from exc
