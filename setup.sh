#!/usr/bin/env bash
# Installs what rackboot needs on Debian 12: Debian packages (apt-get) and a Python virtual
# environment in .venv with rackboot installed in it.
#   ./setup.sh          runtime + vm-testbed (enough for `rackboot serve` and `rackboot demo`)
#   ./setup.sh --test   also the real clients and firmware the test suite drives
#   ./setup.sh --bench  also the peers the benchmarks compare against (dnsmasq, Kea, tftpd-hpa, nginx, ...)
# Needs root (apt-get, network namespaces). Starts no service: Debian packages that ship one
# (tftpd-hpa, kea-dhcp4-server, isc-dhcp-relay, nginx-light) are installed with service start-up blocked and stay disabled.
set -euo pipefail
cd "$(dirname "$0")"

want_test=0 want_bench=0
for arg in "$@"; do
  case $arg in
    --test) want_test=1 ;;
    --bench) want_test=1 want_bench=1 ;;
    *) echo "usage: $0 [--test|--bench]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (apt-get, network namespaces)" >&2; exit 1; }

# Runtime: iPXE binaries to chainload, netlink/tc/nft for the testbed, ipmitool for BMCs,
# sfdisk and mkfs.ext4 for the deploy agent (also on the testbed's file-backed disks), mmdebstrap for
# `rackboot build deploy-env` and `rackboot build image` (from this machine's apt sources), zstd for the image's tar.
pkgs=(ipxe iproute2 busybox ipmitool nftables fdisk e2fsprogs libarchive13 ca-certificates python3 python3-venv python3-dev gcc
      mmdebstrap zstd)
# Tests: the real clients and firmware the end-to-end tier drives; GRUB's installers (only the -bin image
# packages and grub-install: nothing that touches this machine's own bootloader) and mkfs.vfat for the bootloader
# test on a loop device; OpenSSH's client to log in to deployed VMs as a user would; headless Chromium for the
# web dashboard's browser test (tests/test_dashboard_browser.py drives it over the DevTools protocol, on loopback);
# ISC's dhcrelay for the relayed-network test (its service stays disabled: the test runs it in its namespaces).
[ $want_test = 1 ] && pkgs+=(udhcpc isc-dhcp-client tftp-hpa atftp bind9-dnsutils curl iputils-ping tcpdump openssl
                             qemu-system-x86 ipxe-qemu ovmf grub2-common grub-pc-bin grub-efi-amd64-bin dosfstools openssh-client
                             chromium isc-dhcp-relay)
# Benchmarks: the peers we measure against in the same run.
[ $want_bench = 1 ] && pkgs+=(kea-admin kea-dhcp4-server dnsmasq-base tftpd-hpa udpcast pdsh clustershell nginx-light)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing Debian packages: ${missing[*]}"
  # Block service start-up while packages unpack: a DHCP or TFTP daemon must never start on the
  # machine's real interfaces. Our own policy file is removed afterwards; one already there is kept.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  trap '[ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  for svc in tftpd-hpa kea-dhcp4-server kea-dhcp6-server kea-dhcp-ddns-server kea-ctrl-agent isc-dhcp-relay nginx; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras=""
[ $want_test = 1 ] && extras="[test]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".$extras"
echo "setup.sh: ready (.venv/bin/rackboot)"
