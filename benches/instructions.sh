#!/usr/bin/env bash
# Instructions per proxied request: penstock (release build, a budget that
# never binds, cache lookups, metrics, the JSON access log) under callgrind, in
# front of an nginx answering a fixed chat completion. Collection starts after
# a warm-up; the total is divided by the requests wrk counted. Unlike CPU time
# on a shared machine, the count barely moves between runs, so it shows what
# one change to the hot path is worth.
# Needs valgrind, nginx and wrk (Debian: apt-get install valgrind nginx wrk).
# `bash benches/instructions.sh` (SECONDS_MEASURED to change the load;
# BUDGET=off to run penstock with no pool (no `[[budget]]`, learning off),
# PENSTOCK_LOG=warn without
# its access line: what those parts cost)
# `bash benches/instructions.sh syscalls`: instead, system calls, context
# switches and page faults per request under `wrk -t2 -c32`, for penstock, the
# baseline and an nginx `proxy_pass` in turn, counted by the kernel
# (`perf stat`; needs perf and the right to read its tracepoints).
# `bash benches/instructions.sh baseline`: the same count for `examples/baseline.rs`,
# the least a hyper proxy built like penstock does for the request.
# `bash benches/instructions.sh cpu`: no callgrind; penstock, the baseline and
# an nginx `proxy_pass` each loaded with `wrk -t2 -c32` in turn (two rounds),
# and the user and system CPU each spent per request, from /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-instructions}
tools="valgrind callgrind_control callgrind_annotate nginx wrk"
[ "$mode" = syscalls ] && tools="perf nginx wrk"
[ "$mode" = cpu ] && tools="nginx wrk"
for tool in $tools; do
    command -v "$tool" >/dev/null || { echo "instructions: $tool is not installed"; exit 1; }
done
if [ "$mode" = syscalls ] && ! perf stat -e raw_syscalls:sys_enter -o /dev/null -- true 2>/dev/null; then
    echo "instructions: perf cannot read the kernel's tracepoints here (kernel.perf_event_paranoid, or tracefs not mounted)"
    exit 1
fi
cargo build --release -q
case "$mode" in baseline | cpu | syscalls) cargo build --release -q --example baseline ;; esac
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); px=$(free_port)
cleanup() {
    [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
    [ -n "${vg:-}" ] && kill "$vg" 2>/dev/null || true
    [ -f "$dir/proxy.pid" ] && kill "$(cat "$dir/proxy.pid")" 2>/dev/null || true
    [ -n "${base:-}" ] && kill "$base" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
answer='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"The answer is blowing in the wind."},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":9,"total_tokens":26}}'
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
error_log $dir/error.log;
pid $dir/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir;
  server {
    listen 127.0.0.1:$up;
    location / { default_type application/json; return 200 '$answer'; }
  }
}
CONF
nginx -c "$dir/nginx.conf" -p "$dir"
cat > "$dir/penstock.toml" <<CONF
listen = "127.0.0.1:$px"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "http://127.0.0.1:$up"
CONF
# BUDGET=off: no pool at all, configured or learned.
if [ "${BUDGET:-on}" = off ]; then printf '[learn]\nenabled = false\n' >> "$dir/penstock.toml"; fi
[ "${BUDGET:-on}" = off ] || cat >> "$dir/penstock.toml" <<CONF
[[budget]]
name = "text"
models = ["gpt-4o*"]
rpm = 100000000
tpm = 100000000000
CONF
cat > "$dir/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"how many roads must a man walk down"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
LUA
wait_listening() {
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$px/" 2>/dev/null && break
        sleep 0.2
    done
}
url="http://127.0.0.1:$px/v1/chat/completions"
proxy=(target/release/penstock --config "$dir/penstock.toml" --log-format json)
[ "$mode" = baseline ] && proxy=(target/release/examples/baseline "127.0.0.1:$px" "127.0.0.1:$up")
if [ "$mode" = cpu ] || [ "$mode" = syscalls ]; then
    ng=$(free_port); bp=$(free_port)
    cat > "$dir/proxy.conf" <<CONF
worker_processes 2;
error_log $dir/proxy-error.log;
pid $dir/proxy.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir;
  upstream u { server 127.0.0.1:$up; keepalive 64; }
  server {
    listen 127.0.0.1:$ng;
    location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
    nginx -c "$dir/proxy.conf" -p "$dir"
    target/release/penstock --config "$dir/penstock.toml" --log-format json \
        2>"$dir/penstock.log" >/dev/null &
    vg=$!
    target/release/examples/baseline "127.0.0.1:$bp" "127.0.0.1:$up" &
    base=$!
    wait_listening
    sleep 0.5
    tick=$(getconf CLK_TCK)
    secs=${SECONDS_MEASURED:-6}
    events=raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom
    events=$events,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_futex
    events=$events,context-switches,page-faults
    # user and system ticks of the given processes, summed
    ticks() { for p in "$@"; do awk '{print $14, $15}' "/proc/$p/stat"; done | awk '{u+=$1; s+=$2} END {print u, s}'; }
    # Loads one proxy after a warm-up and prints what this mode counts, per request.
    measure() { # name port pids...
        local name=$1 port=$2; shift 2
        local u="http://127.0.0.1:$port/v1/chat/completions" st
        wrk -t2 -c32 -d2s -s "$dir/post.lua" "$u" >/dev/null
        if [ "$mode" = cpu ]; then
            read -r u0 s0 < <(ticks "$@")
        else
            # The count spans the whole load, and a second idle after it.
            perf stat -x, -e "$events" -p "$(IFS=,; echo "$*")" -o "$dir/stat.txt" \
                -- sleep $((secs + 1)) &
            st=$!
        fi
        n=$(wrk -t2 -c32 -d"$secs"s -s "$dir/post.lua" "$u" | awk '/requests in/ {print $1}')
        if [ "$mode" = cpu ]; then
            read -r u1 s1 < <(ticks "$@")
            awk -v name="$name" -v n="$n" -v d="$secs" -v t="$tick" \
                -v u=$((u1 - u0)) -v s=$((s1 - s0)) 'BEGIN {
                printf "%-9s %8.0f req/s  user %5.1f  system %5.1f  CPU %5.1f µs/request\n",
                    name, n / d, u * 1e6 / t / n, s * 1e6 / t / n, (u + s) * 1e6 / t / n }'
        else
            wait "$st"
            awk -F, -v name="$name" -v n="$n" 'BEGIN { printf "%-9s", name }
                $1 ~ /^[0-9]+$/ { e = $3; sub(/^.*sys_enter_?/, "", e); if (e == "") e = "all";
                    printf "  %s %.2f", e, $1 / n } END { print "  (per request)" }' "$dir/stat.txt"
        fi
    }
    workers=$(pgrep -P "$(cat "$dir/proxy.pid")" | tr '\n' ' ')
    rounds=2
    [ "$mode" = syscalls ] && rounds=1
    for _ in $(seq "$rounds"); do
        measure penstock "$px" "$vg"
        measure baseline "$bp" "$base"
        # shellcheck disable=SC2086
        measure nginx "$ng" $workers
    done
    exit 0
fi
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/cg.out" \
    "${proxy[@]}" 2>"$dir/penstock.log" >/dev/null &
vg=$!
wait_listening
wrk -t1 -c4 -d3s -s "$dir/post.lua" "$url" >/dev/null
callgrind_control -i on "$vg" >/dev/null 2>&1
n=$(wrk -t1 -c4 -d"${SECONDS_MEASURED:-8}"s -s "$dir/post.lua" "$url" | awk '/requests in/ {print $1}')
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 1
out=$(ls -t "$dir"/cg.out* | head -1)
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "instructions: $n requests, $((total / n)) instructions per proxied request"
if [ -n "${KEEP_PROFILE:-}" ]; then cp "$out" "$KEEP_PROFILE"; echo "profile kept at $KEEP_PROFILE (callgrind_annotate --inclusive=yes)"; fi
