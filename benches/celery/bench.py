"""The Celery side of flotilla-bench's comparison (see BENCHMARKS.md).

Starts a Redis server on a free loopback port (append-only file fsync'd on
every write, so that an acknowledged task survives a crash, as flotilla's
do; or, with --fsync everysec, once a second), pre-loads N no-op tasks, starts a Celery worker with W prefork
processes and `task_acks_late`, and times from the worker's start to the
last task acknowledged. Prints one JSON line: {"rate": tasks/s, ...}.

Run by `flotilla-bench --scenario celery` with the virtualenv that
scripts/install-celery.sh makes.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import celery
import redis

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, limit):
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"celery bench: {what} not within {limit} s")
        time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--fsync", choices=["always", "everysec"], default="always",
                        help="Redis appendfsync: always (an acknowledged task survives a crash) "
                             "or everysec (Redis' usual setting: up to a second of writes lost)")
    args = parser.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    port = free_port()
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    server = subprocess.Popen(
        [redis_server, "--bind", "127.0.0.1", "--port", str(port), "--dir", args.dir,
         "--save", "", "--appendonly", "yes", "--appendfsync", args.fsync],
        stdout=subprocess.DEVNULL,
    )
    worker = None
    try:
        db = redis.Redis(host="127.0.0.1", port=port)

        def answers():
            try:
                return db.ping()
            except redis.exceptions.ConnectionError:
                return False

        wait_for("redis-server", answers, 10)
        broker = f"redis://127.0.0.1:{port}/0"
        # The harness runs as root in CI-like sandboxes; Celery's warning
        # about it is not news.
        env = dict(os.environ, BENCH_BROKER=broker, PYTHONPATH=HERE, PYTHONWARNINGS="ignore")
        sys.path.insert(0, HERE)
        os.environ["BENCH_BROKER"] = broker
        import noop_app

        # Pre-load the queue, as flotilla's throughput runs do.
        with noop_app.app.producer_or_acquire() as producer:
            for n in range(args.tasks):
                noop_app.noop.apply_async((n,), producer=producer)
        queued = db.llen("celery")
        if queued != args.tasks:
            raise SystemExit(f"celery bench: {queued} of {args.tasks} tasks queued")

        launched = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "noop_app", "worker",
             "--concurrency", str(args.workers), "--pool", "prefork",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel", "WARNING"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL,
        )
        # The clock starts when the worker takes its first task (its start,
        # about a second of Python imports and forks, is not counted) and
        # stops when nothing is queued and nothing delivered is unacked.
        deadline = time.monotonic() + 120
        while db.llen("celery") == args.tasks:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("celery bench: the worker took no task")
            time.sleep(0.001)
        started = time.monotonic()
        wait_for("the queue drained",
                 lambda: db.llen("celery") == 0 and db.hlen("unacked") == 0, 600)
        elapsed = time.monotonic() - started
        versions = (f"Celery {celery.__version__} (Python {sys.version.split()[0]}), "
                    f"Redis {db.info()['redis_version']}")
        print(json.dumps({"rate": args.tasks / elapsed, "seconds": elapsed,
                          "worker_start_seconds": started - launched, "versions": versions}))
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        server.terminate()
        server.wait(10)
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
