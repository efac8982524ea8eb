"""``python -m fleet serve --port N --home DIR`` (and the admin commands)."""

from fleet.cli import main_app

if __name__ == "__main__":
    main_app(prog_name="python -m fleet")
