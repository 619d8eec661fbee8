#!/usr/bin/env bash
# Start the Docker engine if none answers (no systemd on these machines), bounded wait.
set -euo pipefail
if docker info >/dev/null 2>&1; then
    exit 0
fi
echo "setup: starting dockerd (log: /var/log/kaobs-dockerd.log)" >&2
nohup dockerd >/var/log/kaobs-dockerd.log 2>&1 &
for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
done
echo "setup: dockerd did not start within 60 s; see /var/log/kaobs-dockerd.log" >&2
tail -n 20 /var/log/kaobs-dockerd.log >&2 || true
exit 1
