# Shell helpers shared by bench/run and bench/soak. Expects WORK (a
# scratch folder) and PIDS (an array) to exist.

# A free loopback port (the bench's peers need fixed ports in their configs).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        if [ -z "$(ss -Htan "sport = :$p")" ] && ! grep -qx "$p" "$WORK/ports" 2>/dev/null; then
            echo "$p" >> "$WORK/ports"
            echo "$p"
            return
        fi
    done
    echo "bench: no free port" >&2
    exit 1
}

# Waits (bounded) until a command succeeds.
wait_until() {
    local what="$1"; shift
    for _ in $(seq 1 300); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "bench: $what did not come up; logs:" >&2
    tail -n 5 "$WORK"/*.err >&2 || true
    exit 1
}

start() { # name, command...
    local name="$1"; shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
    echo $! > "$WORK/$name.pid"
}

rss_kb() {
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status")))
    done
    echo "$total"
}

check_200() { # url, curl args...
    local url="$1"; shift
    [ "$(curl -sS -o /dev/null -w '%{http_code}' "$@" "$url")" = 200 ]
}
