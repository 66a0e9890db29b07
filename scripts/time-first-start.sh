#!/usr/bin/env bash
# Measure what a fresh box pays on its first `cube serve`, and a restart, on THIS box: a new cache
# (kernel, debootstrap trees, images, eBPF objects) and a new state dir, so nothing is reused.
# apt and the venv are timed by `make` itself ("[set-up] ... ready (N s)"); this script times the
# rest: start -> listening, -> first template serving (a sandbox can be created), -> all templates
# ready; then a restart on the same state -> ready. Run it under the host lock:
#   flock /tmp/cube-host.lock bash scripts/time-first-start.sh [WORK_DIR]
set -euo pipefail
need() { command -v "$1" >/dev/null 2>&1 || { echo "time-first-start: $1 not found (install $2)" >&2; exit 3; }; }
need curl curl; need bc bc
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/cube-first-start.XXXXXX)}
cube=$repo/.venv/bin/cube
port=${PORT:-3990}
mkdir -p "$work/cache" "$work/state"
cat > "$work/plugins.toml" <<EOF
[core]
state_dir = "$work/state"
host = "127.0.0.1"
port = $port
admin_port = 0
templates = ["base", "code-interpreter-v1"]

[vmm]
plugin = "kvm"
options = { run_dir = "$work/state/vms", mem_dir = "/dev/shm/cube-first-start-$port" }

[network]
plugin = "ebpf"
options = { bpf_cache_dir = "$work/cache/bpf" }

[storage]
plugin = "cow"
options = { root = "$work/state/storage", cache = "$work/cache" }

[scheduler]
plugin = "binpack"

[[api]]
plugin = "e2b"
EOF

run() {  # $1: label; prints "label: listening N s, first template N s, all ready N s"
  local start pid listening="" first="" all=""
  start=$(date +%s.%N)
  CUBE_CACHE=$work/cache "$cube" serve --config "$work/plugins.toml" >>"$work/serve-$1.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    local now body code
    now=$(date +%s.%N)
    code=$(curl -s -o "$work/health.json" -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
    [[ -z "$listening" && "$code" != "000" ]] && listening=$(echo "$now - $start" | bc)
    [[ -z "$first" && "$code" == "200" ]] && first=$(echo "$now - $start" | bc)
    body=$(cat "$work/health.json" 2>/dev/null || true)
    if [[ "$code" == "200" ]] && ! grep -qE '"(building|failed)"' <<<"$body"; then
      all=$(echo "$now - $start" | bc); break
    fi
    sleep 0.5
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  printf '%s: listening %.0f s, first template serving %.0f s, all templates ready %.0f s\n' \
    "$1" "${listening:-0}" "${first:-0}" "${all:-0}"
  [[ -n "$all" ]] || { echo "cube serve did not get ready; see $work/serve-$1.log" >&2; exit 1; }
}

run first
run restart
rmdir "/dev/shm/cube-first-start-$port" 2>/dev/null || true  # the servers' RAM-file dir, empty after stop
echo "logs and caches in $work (remove it when done)"
