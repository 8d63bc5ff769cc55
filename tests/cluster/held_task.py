"""A Celery app with the cluster's settings (`autointerp_defs.cluster.celery_settings`) and one task that holds
until released: the lost-worker test's stand-in for a long step, without a Dagster run's start-up cost."""

import os
import time
from pathlib import Path

from celery import Celery

from autointerp_defs.cluster import celery_settings

app = Celery(
    "held", broker=os.environ["AUTOINTERP_BROKER_URL"], backend=os.environ["AUTOINTERP_BROKER_URL"]
)
app.conf.update(celery_settings(int(os.environ["REDELIVER_AFTER_S"])))


@app.task(bind=True)
def hold(self, folder: str) -> str:
    """Leave a file named after the worker that took it, wait for `folder/released`; that worker's name."""
    Path(folder, self.request.hostname).touch()
    while not Path(folder, "released").exists():
        time.sleep(0.1)
    return self.request.hostname
