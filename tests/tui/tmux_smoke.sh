#!/usr/bin/env bash
# Smoke test of `shoal tui` in a real terminal: starts a real node, runs the TUI in a detached tmux session,
# sends keys and checks what the pane shows. Then runs `shoal tui` where no node answers and checks that it
# starts one itself and says so. Needs tmux (`apt-get install -y tmux`). Usage: tests/tui/tmux_smoke.sh
set -euo pipefail

command -v tmux >/dev/null || { echo "tmux_smoke: tmux is not installed (apt-get install -y tmux)"; exit 2; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
SESSION="shoal-tui-smoke-$$"
NODE_PID=""
PASSED=0
FAILED=0

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    tmux kill-session -t "$SESSION-auto" 2>/dev/null || true
    if [[ -n "$NODE_PID" ]]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
    # a node the TUI started for itself is stopped by the TUI on quit; make sure of it
    if [[ -f "$WORK/auto.pid" ]]; then kill "$(cat "$WORK/auto.pid")" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# wait_for SESSION TEXT SECONDS: poll capture-pane until TEXT shows up
wait_for() {
    local session=$1 text=$2 limit=$3 i
    for ((i = 0; i < limit * 5; i++)); do
        if tmux capture-pane -p -t "$session" 2>/dev/null | grep -qF -- "$text"; then
            echo "ok: '$text'"; PASSED=$((PASSED + 1)); return 0
        fi
        sleep 0.2
    done
    echo "FAILED: '$text' did not appear in $limit s; the pane shows:"
    tmux capture-pane -p -t "$session" 2>/dev/null || true
    FAILED=$((FAILED + 1))
}

# press SESSION KEY TEXT: send KEY, wait for TEXT; resend once if it does not show (a keystroke can be lost
# while the terminal answers Textual's start-up queries on a loaded machine), saying so
press() {
    local session=$1 key=$2 text=$3 i
    tmux send-keys -t "$session" "$key"
    for ((i = 0; i < 25; i++)); do
        tmux capture-pane -p -t "$session" | grep -qF -- "$text" && break
        sleep 0.2
    done
    if ! tmux capture-pane -p -t "$session" | grep -qF -- "$text"; then
        echo "note: key '$key' resent"
        tmux send-keys -t "$session" "$key"
    fi
    wait_for "$session" "$text" 10
}

cd "$ROOT"
touch "$WORK/empty.toml"
PORT=$(free_port)
SHOAL_NAME=smoke-node SHOAL_MODELS_PRELOAD=false "$PY" -m shoal.mesh node --api "127.0.0.1:$PORT" \
    --config "$WORK/empty.toml" --data-dir "$WORK/node" --backend numpy >"$WORK/node.log" 2>&1 &
NODE_PID=$!
for _ in $(seq 1 300); do
    "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null && break
    sleep 0.2
done

tmux new-session -d -s "$SESSION" -x 120 -y 34 \
    "cd '$ROOT' && $PY -m shoal.mesh tui --no-start --api http://127.0.0.1:$PORT; sleep 30"
wait_for "$SESSION" "connected" 30
wait_for "$SESSION" "smoke-node" 10
press "$SESSION" 2 "smollm2-135m-instruct"
press "$SESSION" 5 "Battery floor"
press "$SESSION" 6 "shoal.mesh.node.node"
press "$SESSION" '?' "shoal tui — keys"
tmux send-keys -t "$SESSION" Escape
sleep 0.5
tmux send-keys -t "$SESSION" q
sleep 1.5  # the shell's `sleep 30` keeps the pane open after the TUI exits, to read what it left
if tmux capture-pane -p -t "$SESSION" | grep -q "Traceback"; then
    echo "FAILED: a traceback reached the terminal"; FAILED=$((FAILED + 1))
else
    echo "ok: no traceback on screen"; PASSED=$((PASSED + 1))
fi
tmux kill-session -t "$SESSION"

# No node answers at this address: the TUI starts one for the session and says so.
AUTO_PORT=$(free_port)
tmux new-session -d -s "$SESSION-auto" -x 160 -y 34 \
    "cd '$ROOT' && SHOAL_MODELS_PRELOAD=false $PY -m shoal.mesh tui --api http://127.0.0.1:$AUTO_PORT \
     --data-dir '$WORK/auto' --backend numpy; sleep 30"
wait_for "$SESSION-auto" "started one" 20
wait_for "$SESSION-auto" "connected" 60
tmux send-keys -t "$SESSION-auto" q
for _ in $(seq 1 75); do  # the TUI stops the node it started when it quits
    "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$AUTO_PORT/health', timeout=1)" \
        2>/dev/null || break
    sleep 0.2
done
if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$AUTO_PORT/health', timeout=1)" 2>/dev/null; then
    echo "FAILED: the node the TUI started still runs after quitting"; FAILED=$((FAILED + 1))
else
    echo "ok: the node the TUI started stopped with it"; PASSED=$((PASSED + 1))
fi

echo "tmux_smoke: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
