#!/usr/bin/env bash
# TorchServe's frontend is Java: install a JRE when none is on PATH (Debian; needs root).
set -euo pipefail
if command -v java >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "java is missing: install a JRE 17 (e.g. sudo apt-get install -y openjdk-17-jre-headless)" >&2
    exit 1
fi
echo "java is missing: installing openjdk-17-jre-headless" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
java -version
