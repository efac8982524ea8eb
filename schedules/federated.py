"""Weekly federated round across the camera sites.

A federation asks every site's training node for local epochs, so it runs when the sites
are quiet (Sunday 03:00 UTC) and weekly: often enough that a week's locally labelled frames
reach the shared model, rarely enough that site compute stays a small share. Stopped by
default: a deployment turns it on once its sites' SuperNodes are enrolled.
"""

import dagster as dg

from jobs import federated_learning_loop_job

federated_rounds_schedule = dg.ScheduleDefinition(
    name="federated_rounds_schedule",
    job=federated_learning_loop_job,
    cron_schedule="0 3 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
