#!/usr/bin/env bash
# Install the OS packages hdrlog, its demo and its tests need on Debian 12, and kernel headers for BCC.
# Idempotent: does nothing when everything is already there. Needs root.
set -euo pipefail

PACKAGES=(
  # BCC and netlink from the OS (PyPI's "bcc" is an unrelated package)
  python3-bpfcc bpfcc-tools python3-pyroute2 python3-venv python3-dev
  # namespace labs: veth, tc, traffic
  iproute2 iputils-ping ethtool curl iperf3 procps
  # tests: tshark is the oracle, tcpreplay replays the corpus
  tshark tcpreplay
  # report tests render the HTML report in headless Chromium
  chromium fonts-dejavu-core fonts-liberation
  # the multi-host Ansible lab (tests/e2e): a Debian root filesystem booted with systemd-nspawn,
  # reached over SSH; the bridge comes from iproute2 (bridge-utils only to inspect it)
  debootstrap debian-archive-keyring systemd-container openssh-client bridge-utils
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-os: run as root (apt-get and /lib/modules need it)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

kver=$(uname -r)
headers_ok=0
if [ -e "/lib/modules/$kver/build/Makefile" ] && { [ -e "/lib/modules/$kver/build/include/uapi/linux/bpf.h" ] ||
   [ -e "/lib/modules/$kver/source/include/uapi/linux/bpf.h" ]; }; then
  headers_ok=1
fi

updated=0
apt_update() { [ $updated -eq 1 ] || { apt-get update -q; updated=1; }; }

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-os: installing ${missing[*]}"
  apt_update
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ $headers_ok -eq 0 ]; then
  apt_update
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$kver"
  else
    # A custom kernel without a headers package: TC programs use only uapi headers,
    # so the distribution's nearest headers are sound. Point the module build dir at them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64
    build=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$build" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
    echo "install-os: WARNING: no headers package for kernel $kver; using $(basename "$build") for BCC (uapi only, so a nearby version is sound)" >&2
  fi
fi
