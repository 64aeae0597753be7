#!/usr/bin/env bash
# Fail when a test or the demo left something of ours behind: a namespace, a BPF
# TC filter or tcx link, or a hdrlog process.
set -u
bad=0
ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^hl' || true)
if [ -n "$ns" ]; then echo "check-clean: namespaces left: $ns" >&2; bad=1; fi
for d in $(ls /sys/class/net); do
  for dir in ingress egress; do
    if tc filter show dev "$d" "$dir" 2>/dev/null | grep -q 'hdrlog'; then
      echo "check-clean: hdrlog TC filter left on $d $dir" >&2; bad=1
    fi
  done
done
# tcx links (what the collector attaches on Linux 6.6+) do not show in `tc filter show`.
tcx=$("${PYTHON:-.venv/bin/python}" -c '
import os
from hdrlog.collector import bpfsys
for d in os.listdir("/sys/class/net"):
    for direction in ("ingress", "egress"):
        for name in bpfsys.tcx_program_names(d, direction):
            if name.startswith("hdrlog"):
                print(d, direction, name)
' 2>&1)
if [ -n "$tcx" ]; then echo "check-clean: hdrlog tcx programs left: $tcx" >&2; bad=1; fi
procs=$(pgrep -af 'hdrlog (server|collector)|hdrlog.server|hdrlog.dev.demo' | grep -v pgrep || true)
if [ -n "$procs" ]; then echo "check-clean: processes left: $procs" >&2; bad=1; fi
[ $bad -eq 0 ] && echo "check-clean: nothing left behind"
exit $bad
