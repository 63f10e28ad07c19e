#!/usr/bin/env bash
# Install OpenSSH's server (and client) from the distribution's openssh-server package, unless
# /usr/sbin/sshd is already there. tests/test_remote.py starts a throwaway sshd on 127.0.0.1 to measure
# latency "remotely" on this machine; it skips without one. Needs root or sudo and apt.
set -euo pipefail
if [ -x /usr/sbin/sshd ]; then
    echo "openssh-server is already installed (/usr/sbin/sshd)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install openssh-server with this system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client
echo "openssh-server installed (/usr/sbin/sshd)"
