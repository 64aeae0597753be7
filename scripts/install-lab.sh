#!/usr/bin/env bash
# Install what the multi-host Ansible lab (tests/e2e) needs on the test machine:
# debootstrap to build the Debian 12 root filesystem once, systemd-container for
# systemd-nspawn/machinectl, an SSH client to reach the lab's hosts, bridge-utils
# and iproute2 for the lab bridge. Idempotent: does nothing when all is there. Needs root.
set -euo pipefail

PACKAGES=(
  debootstrap          # builds the lab's Debian 12 root filesystem (cached under /var/cache/hdrlog-lab)
  systemd-container    # systemd-nspawn -b and machinectl: one booted Debian per lab host
  openssh-client       # ssh/ssh-keygen: Ansible reaches the hosts over SSH with a per-run key
  bridge-utils         # brctl, to inspect the lab bridge hlbr0 (iproute2 creates it)
  iproute2             # ip link/addr for the bridge, tc to prove no filter is left
  debian-archive-keyring
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-lab: run as root (apt-get needs it)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-lab: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
