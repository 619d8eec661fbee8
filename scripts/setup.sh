#!/usr/bin/env bash
# Everything kaobs and its test suite need on a fresh Debian 12 machine, as root.
# Idempotent: a second run installs nothing and reuses the running engine and image.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

need_apt=()
for cmd in dockerd:docker.io tcpdump:tcpdump tshark:tshark debootstrap:debootstrap ip:iproute2 iptables:iptables nsenter:util-linux chromium:chromium prometheus:prometheus promtool:prometheus; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need_apt+=("${cmd#*:}")
done
# chromium opens the --html pages in the tests; without a font its screenshots are empty boxes
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Debian's own python3 may lack pip, and marks itself externally managed (PEP 668):
# install pip if needed and let it install beside Debian's packages, as root on a
# machine dedicated to this (a pyenv or venv python ignores the variable).
if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --disable-pip-version-check -e "$here[test]" 2>&1 | grep -v -e "Running pip as the 'root' user" -e "^WARNING: Location" >&2 || true
python3 -c "import kaobs.cli, scapy, psycopg, rich, docker, pcapy, zstandard, bokeh, playwright, mermaidx, prometheus_client, yaml, check_jsonschema, kubernetes_validate" >/dev/null

bash "$here/scripts/start-docker.sh"
bash "$here/scripts/build-pg-image.sh"
bash "$here/scripts/build-kaobs-image.sh"
