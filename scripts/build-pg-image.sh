#!/usr/bin/env bash
# Build kaobs/postgres:15-local, a stand-in for the official `postgres` image,
# from Debian's own packages (no container registry is reachable here).
#
# It keeps the official image's interface, which is what `kaobs lab` and users
# rely on:  docker run -e POSTGRES_PASSWORD=x IMAGE postgres --tcp_keepalives_idle=3 ...
#   * entrypoint docker-entrypoint.sh: initdb on first start (POSTGRES_PASSWORD,
#     POSTGRES_USER, POSTGRES_DB, POSTGRES_HOST_AUTH_METHOD), listen on '*',
#     then exec the command as user postgres; any other command runs as given;
#   * PGDATA=/var/lib/postgresql/data, port 5432, `postgres` and `psql` on PATH.
# It also carries iproute2 and procps, which the official image lacks; kaobs
# does not depend on them (faults are applied from the host side).
#
# Cached: does nothing when the tag exists, unless --force.
set -euo pipefail
tag="${KAOBS_PG_IMAGE:-kaobs/postgres:15-local}"
mirror="${KAOBS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if [[ "${1:-}" != "--force" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "setup: image $tag present" >&2
    exit 0
fi
work="$(mktemp -d /var/tmp/kaobs-rootfs.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
echo "setup: building $tag with debootstrap (a few minutes; log: $work/debootstrap.log)" >&2
if ! debootstrap --variant=minbase --include=postgresql-15,iproute2,procps,ca-certificates \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    echo "setup: debootstrap failed" >&2
    exit 1
fi

# The Debian package starts a cluster of its own under /var/lib/postgresql/15;
# the official image has none: drop it so PGDATA is the only cluster.
rm -rf "$root/var/lib/postgresql/15" "$root/etc/postgresql/15"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
mkdir -p "$root/var/lib/postgresql/data" "$root/var/run/postgresql" "$root/docker-entrypoint-initdb.d"
chroot "$root" chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
chmod 2777 "$root/var/run/postgresql"

cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'ENTRY'
#!/bin/bash
# The official image's contract, in short: initdb once, then run as postgres.
set -Eeo pipefail
if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi
if [ "$1" != 'postgres' ]; then
    exec "$@"
fi
if [ "$(id -u)" = '0' ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec runuser -u postgres -- "$BASH_SOURCE" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != 'trust' ]; then
        echo >&2 'Error: Database is uninitialized and superuser password is not specified.'
        echo >&2 '       Set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD=trust.'
        exit 1
    fi
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-unused}" >"$pwfile"
    initdb --username="${POSTGRES_USER:-postgres}" --pwfile="$pwfile" \
        --auth-local=trust --auth-host="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" \
        --encoding=UTF8 --locale=C.UTF-8 $POSTGRES_INITDB_ARGS >/dev/null
    rm -f "$pwfile"
    printf "\nhost all all all %s\n" "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
    printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    db="${POSTGRES_DB:-${POSTGRES_USER:-postgres}}"
    if [ "$db" != 'postgres' ]; then
        postgres --single -D "$PGDATA" -jE postgres <<<"CREATE DATABASE \"$db\";" >/dev/null
    fi
    echo 'PostgreSQL init process complete; ready for start up.'
fi
exec "$@"
ENTRY
chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"

tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV PGDATA=/var/lib/postgresql/data' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'ENTRYPOINT ["docker-entrypoint.sh"]' \
    -c 'CMD ["postgres"]' \
    -c 'EXPOSE 5432' \
    -m "kaobs: Debian bookworm postgresql-15, official postgres image interface" \
    - "$tag" >/dev/null
echo "setup: built $tag" >&2
