#!/bin/sh
# Example oneshot flotilla agent: counts the words of a text.
#
# flotilla starts one process per task, for example with:
#
#   [agents.wc]
#   mode = "oneshot"
#   command = ["examples/agents/oneshot.sh", "{payload.text}"]
#   fatal_exit_codes = [3]
#
# What it relies on (see docs/protocol.md, "Oneshot mode"):
# - $1 is payload.text, inserted by flotilla as one argument, as-is. No shell
#   parses it, so quotes, spaces and `$` in the text are harmless.
# - stdin holds the task message (one JSON line), then is closed.
# - Every line on stdout or stderr counts as progress; stderr is logged.
# - Exit 0: stdout is the result. It is valid JSON, so it is stored parsed.
# - Exit 3: the input is unusable. Listed in fatal_exit_codes, the task goes to
#   the dead-letter queue instead of being retried. Any other non-zero exit
#   (including being killed) is retried.
set -eu

text=${1-}
task=$(cat)

# The task id, for logs. flotilla writes compact JSON with "type" then "id"
# first, so the first `"id":"` in the message is the task's own id.
id=unknown
case $task in
    *'"id":"'*)
        id=${task#*\"id\":\"}  # drop everything up to the first "id":"
        id=${id%%\"*}           # keep up to the closing quote
        ;;
esac
case $id in
    '' | *[!A-Za-z0-9._:-]*) id=unknown ;;  # keep only plain ids: safe in JSON
esac

if [ -z "$text" ]; then
    echo "oneshot.sh: task $id: payload.text is empty, nothing to count" >&2
    exit 3
fi

echo "oneshot.sh: task $id: counting words" >&2
words=$(printf '%s\n' "$text" | wc -w | tr -d ' \t')
echo "oneshot.sh: task $id: found $words words" >&2

if command -v python3 >/dev/null 2>&1; then
    # Let a real JSON encoder escape the text.
    python3 -c 'import json, sys
print(json.dumps({"words": int(sys.argv[1]), "text": sys.argv[2], "task": sys.argv[3]}))' \
        "$words" "$text" "$id"
else
    # No JSON encoder: leave the text out rather than risk invalid JSON.
    printf '{"words":%s,"task":"%s"}\n' "$words" "$id"
fi
