#!/usr/bin/env bash
# Fail when a test or the demo left something of ours behind: a namespace, a BPF TC filter or
# tcx link, a lab machine or bridge, or a hdrlog process.
#
#   check-clean.sh                 everything of ours found now is a failure
#   check-clean.sh --before FILE   write down what is already here (before a run) ...
#   check-clean.sh --since FILE    ... and fail only on what appeared after that
#
# `make test` uses the pair, so leftovers of an earlier, killed run (or a hdrlog service this
# machine really runs) are named but not blamed on this run.
set -u
PY=${PYTHON:-.venv/bin/python}

inventory() {
  ip netns list 2>/dev/null | awk '$1 ~ /^hl/ {print "namespace " $1}'
  for d in $(ls /sys/class/net); do
    case $d in hlbr*) echo "link $d";; esac  # the e2e fleet's bridge
    for dir in ingress egress; do
      if tc filter show dev "$d" "$dir" 2>/dev/null | grep -q 'hdrlog'; then echo "tc-filter $d $dir"; fi
    done
  done
  # tcx links (what the collector attaches on Linux 6.6+) do not show in `tc filter show`.
  "$PY" -c '
import os
from hdrlog.collector import bpfsys
for d in os.listdir("/sys/class/net"):
    for direction in ("ingress", "egress"):
        for name in bpfsys.tcx_program_names(d, direction):
            if name.startswith("hdrlog"):
                print("tcx", d, direction, name)
' 2>&1
  machinectl list --no-legend 2>/dev/null | awk '$1 ~ /^hl/ {print "machine " $1}'
  awk '$2 ~ /\/hdrlog-lab-/ {print "mount " $2}' /proc/self/mounts  # the fleet's overlays
  pgrep -af 'hdrlog (server|collector)|hdrlog.server|hdrlog.dev.demo' | grep -v pgrep | sed 's/^/process /'
}

case "${1:-}" in
  --before)
    inventory | sort >"$2"
    exit 0;;
  --since)
    before=$(sort "$2")
    now=$(inventory | sort)
    old=$(comm -12 <(echo "$before") <(echo "$now") | sed '/^$/d')
    new=$(comm -13 <(echo "$before") <(echo "$now") | sed '/^$/d')
    rm -f "$2";;
  "")
    old=""
    new=$(inventory | sort);;
  *)
    echo "usage: check-clean.sh [--before FILE | --since FILE]" >&2; exit 2;;
esac

if [ -n "$old" ]; then
  echo "check-clean: already here before this run, not counted:" >&2
  echo "$old" | sed 's/^/  /' >&2
fi
if [ -n "$new" ]; then
  echo "check-clean: left behind:" >&2
  echo "$new" | sed 's/^/  /' >&2
  exit 1
fi
echo "check-clean: nothing left behind"
