#!/usr/bin/env bash
# Run kaobs's privileged validation suite inside the kaobs test image, as a CI job in a
# privileged container would: `docker run --privileged` with the host's Docker socket
# (not Docker-in-Docker: the lab's containers are the host engine's, which is what a
# GitHub Actions or GitLab CI job with the socket gets, and it needs no second engine,
# no nested overlayfs and no image copy into an inner engine).
#   --network host  capture on the host's bridges and veths, where the lab's traffic is
#   --pid host      nsenter into the lab containers' network namespaces by their host pid
#   -v /tmp:/tmp    paths the tests hand to the engine exist on the host too
# Extra arguments go to pytest (default: -m privileged).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
image="${KAOBS_TEST_IMAGE:-kaobs/kaobs-test:local}"
bash "$here/scripts/build-kaobs-image.sh"
(($#)) || set -- -m privileged
common=(--rm --network host --pid host
        -v /var/run/docker.sock:/var/run/docker.sock -v /tmp:/tmp
        -e KAOBS_REQUIRE_PRIVILEGED=1 -e CI="${CI:-}")
# --privileged asks for every capability; where the host's own bounding set lacks some (a
# sandboxed CI runner), the engine refuses it: then all the capabilities there are, and no
# seccomp/AppArmor confinement nor masked /proc and /sys paths, which is what --privileged
# means apart from the missing capabilities.
if docker run --rm --privileged --entrypoint true "$image" >/dev/null 2>&1; then
    mode=(--privileged)
else
    # capability(7) numbers to names; the ones missing from this process's bounding set are dropped
    names=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE
           NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT
           SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE
           AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ
           PERFMON BPF CHECKPOINT_RESTORE)
    bounding=$((16#$(awk '/^CapBnd/ {print $2}' /proc/self/status)))
    drop=()
    for i in "${!names[@]}"; do (( (bounding >> i) & 1 )) || drop+=(--cap-drop "${names[$i]}"); done
    echo "test-in-container: the engine refuses --privileged here (this host lacks${drop[*]//--cap-drop/}):" \
         "all the other capabilities, unconfined" >&2
    mode=(--cap-add ALL "${drop[@]}" --security-opt seccomp=unconfined --security-opt apparmor=unconfined
          --security-opt systempaths=unconfined --device-cgroup-rule 'a *:* rwm')
fi
echo "test-in-container: docker run ${mode[*]} $image python3 -m pytest -q -ra $*" >&2
exec docker run "${common[@]}" "${mode[@]}" "$image" python3 -m pytest -q -ra "$@"
