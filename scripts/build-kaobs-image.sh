#!/usr/bin/env bash
# Build the kaobs images here, with no container registry: the Dockerfile's two targets
#   kaobs/kaobs:local       (runtime: what users run)
#   kaobs/kaobs-test:local  (runtime + pytest, tshark, tcpdump, prometheus, the Docker client)
# FROM kaobs/debian-python:bookworm-local, a Debian 12 base made with debootstrap from
# Debian's packages (python3, pip, libpcap, iproute2, procps) in place of the official
# python:3.11-slim-bookworm image. Python wheels and the test image's Debian packages are
# fetched here into /var/cache/kaobs-image and put in the build context, so `docker build`
# runs with --network none. Elsewhere, `docker build -t kaobs .` does the same from the
# official image and the registries.
#
# Cached: nothing is rebuilt when the images carry the hash of the current sources
# (--force rebuilds all, the base included).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
base="${KAOBS_BASE_IMAGE:-kaobs/debian-python:bookworm-local}"
runtime="${KAOBS_IMAGE:-kaobs/kaobs:local}"
testimg="${KAOBS_TEST_IMAGE:-kaobs/kaobs-test:local}"
mirror="${KAOBS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${KAOBS_IMAGE_CACHE:-/var/cache/kaobs-image}"
force=0
[[ "${1:-}" == "--force" ]] && force=1
export DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$cache"

# The sources the images are made of, as a stream with stable metadata (its hash names the build).
sources() {
    tar -C "$here" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=.pytest_cache \
        --exclude=.hypothesis --exclude='*.egg-info' --exclude=./build -cf - .
}
hash="$(sources | sha256sum | cut -c1-16)"
have_hash() { [[ "$(docker image inspect -f '{{index .Config.Labels "org.kaobs.source-hash"}}' "$1" 2>/dev/null)" == "$hash" ]]; }
if ((!force)) && have_hash "$runtime" && have_hash "$testimg"; then
    echo "setup: images $runtime and $testimg are current ($hash)" >&2
    exit 0
fi

# 1. The Debian base, once (and the test packages downloaded from inside it, so that
#    exactly what it lacks is fetched, with its dependencies).
if ((force)) || ! docker image inspect "$base" >/dev/null 2>&1 || ! ls "$cache"/debs/*.deb >/dev/null 2>&1; then
    work="$(mktemp -d /var/tmp/kaobs-base.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    root="$work/rootfs"
    echo "setup: building $base with debootstrap (log: $work/debootstrap.log)" >&2
    if ! debootstrap --variant=minbase --include=python3,python3-pip,libpcap0.8,iproute2,procps,ca-certificates \
            bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
        tail -n 30 "$work/debootstrap.log" >&2
        echo "setup: debootstrap failed" >&2
        exit 1
    fi
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" apt-get update -qq
    chroot "$root" apt-get install -y -qq --download-only --no-install-recommends \
        tshark tcpdump prometheus docker.io iptables >/dev/null
    rm -rf "$cache/debs" && mkdir -p "$cache/debs"
    mv "$root"/var/cache/apt/archives/*.deb "$cache/debs/"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    : >"$root/etc/resolv.conf"
    tar -C "$root" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["python3"]' \
        -m "kaobs: Debian bookworm python3 + pip + libpcap, in place of python:3.11-slim-bookworm" \
        - "$base" >/dev/null
    rm -rf "$work"
    trap - EXIT
fi

# 2. Python wheels for kaobs and its tests (kaobs itself is built from the sources in the image).
echo "setup: fetching Python wheels into $cache/wheels" >&2
mkdir -p "$cache/wheels"
python3 -m pip wheel -q -w "$cache/wheels" "setuptools>=61" wheel "$here[test]" 2>&1 \
    | grep -v -e "Running pip as the 'root' user" -e '^WARNING: Location' >&2 || true
rm -f "$cache"/wheels/kaobs-*.whl

# 3. A build context of the sources plus .wheels and .debs, and an offline build.
ctx="$(mktemp -d /var/tmp/kaobs-context.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT
sources | tar -C "$ctx" -xf -
cp -al "$cache/wheels" "$ctx/.wheels" 2>/dev/null || cp -a "$cache/wheels" "$ctx/.wheels"
cp -al "$cache/debs" "$ctx/.debs" 2>/dev/null || cp -a "$cache/debs" "$ctx/.debs"
for target in runtime test; do
    tag="$runtime"; [[ $target == test ]] && tag="$testimg"
    echo "setup: building $tag (docker build --target $target --network none)" >&2
    if ! docker build --network none --build-arg "BASE=$base" --target "$target" \
            --label "org.kaobs.source-hash=$hash" -t "$tag" "$ctx" >"$ctx.$target.log" 2>&1; then
        tail -n 40 "$ctx.$target.log" >&2
        echo "setup: docker build of $tag failed (log: $ctx.$target.log)" >&2
        exit 1
    fi
    rm -f "$ctx.$target.log"
done
echo "setup: built $runtime and $testimg ($hash)" >&2
