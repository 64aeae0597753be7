#!/usr/bin/env bash
# Install what `hdrlog report` tests need from Debian: headless Chromium (renders the HTML
# report to a PNG in tests) and fonts for it. Idempotent: does nothing when present. Needs root.
set -euo pipefail

PACKAGES=(chromium fonts-dejavu-core fonts-liberation)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-report-deps: run as root (apt-get needs it)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-report-deps: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
