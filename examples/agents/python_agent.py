#!/usr/bin/env python3
"""Example persistent flotilla agent (protocol v1), standard library only.

Payload {"text": "...", "steps": N, "step_ms": M}: does N toy steps (default 3)
of M milliseconds each (default 0), sending `progress` with the checkpoint
{"step": i} after each; on a retry resumes after the checkpoint's step; answers
{"upper": TEXT, "steps": N, "resumed_from": K}. No "text": non-retryable error.

One task at a time (`concurrency = 1`). A thread only reads stdin into a queue;
the main loop waits for "next step due or message arrived, whichever is first",
so a `cancel` or `shutdown` is seen between steps. See docs/protocol.md.
"""
import json
import os
import queue
import sys
import threading
import time
from collections import deque


def send(message):
    """Write one protocol message to stdout as a single line, then flush."""
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()  # without this, flotilla may see nothing until we exit


def log(*args):
    """stderr is free-form text: flotilla just logs it."""
    print("python_agent:", *args, file=sys.stderr, flush=True)


def read_stdin(inbox):
    """Reader thread: queue every stdin line, then None at end of input."""
    for raw in sys.stdin.buffer:
        inbox.put(raw.decode("utf-8", errors="replace"))
    inbox.put(None)


class Job:
    """A task being worked on: steps done so far, and when the next is due."""

    def __init__(self, task):
        self.id = task.get("id")
        payload = task.get("payload")
        if not isinstance(payload, dict) or "text" not in payload:
            raise ValueError('payload is missing required field "text"')
        self.steps = payload.get("steps", 3)
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError('payload field "steps" must be a non-negative integer')
        self.text = str(payload["text"])
        self.step_s = max(0.0, float(payload.get("step_ms", 0))) / 1000
        # A retried task carries the checkpoint of the last `progress` we sent.
        checkpoint = task.get("checkpoint")
        done = checkpoint.get("step") if isinstance(checkpoint, dict) else 0
        self.done = min(max(done, 0), self.steps) if isinstance(done, int) else 0
        self.resumed_from = self.done
        self.next_at = time.monotonic() + self.step_s

    def step(self):
        """Do one step of toy work. Returns True once the task is answered."""
        if self.done < self.steps:
            self.done += 1
            send({"type": "progress", "id": self.id,
                  "step": f"step {self.done}/{self.steps}",
                  "checkpoint": {"step": self.done}})
            self.next_at = time.monotonic() + self.step_s
        if self.done < self.steps:
            return False
        send({"type": "result", "id": self.id,
              "output": {"upper": self.text.upper(), "steps": self.steps,
                         "resumed_from": self.resumed_from}})
        return True


def start(task):
    """A Job for `task`, or None after answering it with a non-retryable error."""
    try:
        return Job(task)
    except (TypeError, ValueError) as error:
        # Retrying cannot fix a bad payload: let it go to the dead-letter queue.
        send({"type": "error", "id": task.get("id"), "message": str(error),
              "retryable": False})
        return None


def main():
    inbox = queue.Queue()
    threading.Thread(target=read_stdin, args=(inbox,), daemon=True).start()
    send({"type": "ready", "protocol": 1})
    waiting = deque()  # tasks not started yet (only if concurrency > 1)
    job = None
    while True:
        while job is None and waiting:
            job = start(waiting.popleft())
        # Sleep until the next step is due, unless a message arrives first.
        timeout = max(0.0, job.next_at - time.monotonic()) if job else None
        try:
            line = inbox.get(timeout=timeout)
        except queue.Empty:
            job = None if job.step() else job
            continue
        if line is None:  # stdin closed: flotilla is gone
            log("stdin closed, exiting")
            return 0
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):  # never crash on a bad line
            log(f"ignoring a line that is not a JSON object: {line[:120]!r}")
            continue
        kind, task_id = message.get("type"), message.get("id")
        if kind == "task":
            waiting.append(message)
        elif kind == "cancel":  # abandon it, and send nothing more for it
            log("cancelled", task_id)
            job = None if job and job.id == task_id else job
            waiting = deque(t for t in waiting if t.get("id") != task_id)
        elif kind == "shutdown":
            # Unfinished work is not lost: flotilla retries it elsewhere,
            # starting from our last checkpoint.
            log("shutdown requested, exiting")
            return 0
        else:
            log("ignoring unknown message type", repr(kind))  # forward compatible


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # exit at once, although the reader thread is blocked on stdin
