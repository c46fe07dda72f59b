"""The Celery app of the comparison: one no-op task, acknowledged late."""

import os

from celery import Celery

app = Celery("noop_app", broker=os.environ["BENCH_BROKER"])
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    broker_transport_options={"visibility_timeout": 3600},
)


@app.task
def noop(n):
    return None
