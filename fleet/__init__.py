"""roadloop fleet gateway: enrollment, frame intake and heartbeats for edge agents.

A service, not Dagster code: it never imports dagster, torch or ultralytics. The API
contract is ``docs/fleet-api.md``; ``create_app(GatewaySettings())`` builds the app.
"""

from fleet.app import create_app
from fleet.config import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
