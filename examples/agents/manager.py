#!/usr/bin/env python3
"""A manager agent for flotilla: it splits each task among specialists,
waits for their answers and combines them.

Task payload: {"ask": {"backend": {...}, "frontend": {...}}} maps each
specialist agent to the payload it gets. The result holds every answer.

Delegation in the protocol (docs/protocol.md, `send` and `reply`):
- one `send` per specialist, with `wait: true` and a `timeout_ms`;
- the key names the piece of work: if this replica crashes and the task is
  retried, the same keys reach the same child tasks, which are not run
  again (a finished one answers at once);
- a `reply` arrives for each send, matched by task id and key.
"""

import json
import sys


def send(message):
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main():
    send({"type": "ready", "protocol": 1})
    waiting = {}  # task id -> {"want": set of keys, "answers": {key: reply}}
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        kind = message.get("type")
        if kind == "shutdown":
            return 0
        if kind == "task":
            task_id = message["id"]
            ask = message.get("payload", {}).get("ask")
            if not isinstance(ask, dict) or not ask:
                send({"type": "error", "id": task_id, "retryable": False,
                      "message": 'payload needs "ask": {AGENT: PAYLOAD, ...}'})
                continue
            waiting[task_id] = {"want": set(ask), "answers": {}}
            for agent, payload in ask.items():
                send({"type": "send", "id": task_id, "to": agent, "key": agent,
                      "payload": payload, "wait": True, "timeout_ms": 600000})
        elif kind == "reply":
            job = waiting.get(message.get("id"))
            if job is None:  # a reply for a task this replica no longer holds
                continue
            job["answers"][message["key"]] = {
                "status": message["status"],
                "result": message.get("result"),
                "error": message.get("error"),
            }
            if set(job["answers"]) == job["want"]:
                send({"type": "result", "id": message["id"],
                      "output": {"answers": job["answers"]}})
                del waiting[message["id"]]
        elif kind == "cancel":
            waiting.pop(message.get("id"), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
