#!/bin/sh
# Build a Debian bookworm root filesystem for the isolated test hosts (sandbox/testhosts.py).
#
#   build-rootfs.sh base ROOT   debootstrap a fresh tree into ROOT (must not exist or be empty)
#   build-rootfs.sh db ROOT     ROOT already holds a copy of the base tree: add postgresql-15
#   build-rootfs.sh app ROOT    ROOT already holds a copy of the base tree: add Django, gunicorn and
#                               pgbouncer for the web/worker hosts (the app itself is provisioned per
#                               host by sandbox/provision.py, so app changes need no image rebuild)
#
# Run it under `unshare --mount --propagation private` (ensure_image() does): the /proc and /dev
# mounts made for apt in the chroot then vanish with that namespace and never reach the machine.
# Any edit to this file changes the image tag, so the next ensure_image() rebuilds.
set -eu

VARIANT=$1
R=$2
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
BASE_PACKAGES="openssh-server sudo nginx-light supervisor postgresql-client python3 iproute2 procps less curl ca-certificates"
DB_PACKAGES="postgresql-15"
APP_PACKAGES="python3-django python3-psycopg2 gunicorn pgbouncer"
export LC_ALL=C.UTF-8 LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive

in_chroot() {
    chroot "$R" /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# /proc and /dev for maintainer scripts, DNS for apt. Only visible in this mount namespace.
prepare_chroot() {
    mount -t proc proc "$R/proc"
    mount --rbind /dev "$R/dev"
    cp /etc/resolv.conf "$R/etc/resolv.conf"
}

apt_install() {
    in_chroot apt-get -q update
    in_chroot apt-get -y -q -o Dpkg::Options::=--force-confold upgrade
    in_chroot apt-get -y -q -o Dpkg::Options::=--force-confold install --no-install-recommends "$@"
}

# Drop everything apt and dpkg leave behind that a host does not need. apt's `clean` no longer
# removes the caches once Dir::Cache::pkgcache is "", so delete them directly.
cleanup() {
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin \
        "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/apt/archives/partial/* \
        "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old
    find "$R/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
    find "$R/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$R"/usr/share/man/* "$R"/usr/share/locale/* "$R"/usr/share/info/*
    find "$R/var/log" -type f -exec truncate -s 0 {} +
    rm -f "$R"/etc/ssh/ssh_host_*
    : >"$R/etc/resolv.conf"
}

build_base() {
    debootstrap --variant=minbase "$SUITE" "$R" "$MIRROR"

    cat >"$R/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # Maintainer scripts start no services, now and when a runbook upgrades packages in a host.
    printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
    chmod 755 "$R/usr/sbin/policy-rc.d"
    # Keep each host's overlay upper layer small when a runbook runs apt inside it.
    cat >"$R/etc/apt/apt.conf.d/90testhost" <<'EOF'
Binary::apt::APT::Keep-Downloaded-Packages "false";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Install-Recommends "false";
EOF
    cat >"$R/etc/dpkg/dpkg.cfg.d/90testhost-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF

    prepare_chroot
    # shellcheck disable=SC2086
    apt_install $BASE_PACKAGES

    # The deploy user: key login only. useradd leaves the password "!" (locked), which sshd
    # refuses even for key auth when PAM is off; "*" is "no password" but not locked.
    in_chroot useradd --create-home --shell /bin/bash --uid 1000 --user-group deploy
    in_chroot usermod -p '*' deploy
    install -d -m 700 -o 1000 -g 1000 "$R/home/deploy/.ssh"
    # Sysadmins are added to these groups by the runbooks.
    in_chroot sh -c 'getent group admin >/dev/null || groupadd admin'
    in_chroot sh -c 'getent group sudo >/dev/null || groupadd sudo'
    printf 'deploy ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$R/etc/sudoers.d/deploy"
    printf '%%sudo ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$R/etc/sudoers.d/sudo-nopasswd"
    chmod 440 "$R/etc/sudoers.d/deploy" "$R/etc/sudoers.d/sudo-nopasswd"
    in_chroot visudo -c -q

    # Debian's sshd_config includes sshd_config.d/*.conf first, and the first value wins.
    cat >"$R/etc/ssh/sshd_config.d/10-testhost.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
X11Forwarding no
AuthorizedKeysFile .ssh/authorized_keys .ssh/authorized_keys2
MaxStartups 100:30:200
EOF

    # supervisord is PID 1 of every host; sshd is started by init.sh before it.
    cat >"$R/etc/supervisor/conf.d/00-testhost.conf" <<'EOF'
[program:nginx]
command=/usr/sbin/nginx -g "daemon off;"
autorestart=true
redirect_stderr=true
stdout_logfile=/var/log/supervisor/nginx.log
EOF
    install -d -m 755 "$R/var/www/html" "$R/etc/testhost/boot.d"
    printf 'testhost\n' >"$R/etc/hostname"
    cleanup
}

build_db() {
    prepare_chroot
    # shellcheck disable=SC2086
    apt_install $DB_PACKAGES
    test -f "$R/etc/postgresql/15/main/postgresql.conf" ||
        in_chroot pg_createcluster 15 main
    cat >"$R/etc/postgresql/15/main/conf.d/90-testhost.conf" <<'EOF'
listen_addresses = '*'
port = 5432
# Test hosts only: fast and unsafe.
fsync = off
synchronous_commit = off
full_page_writes = off
jit = off
EOF
    cat >"$R/etc/postgresql/15/main/pg_hba.conf" <<'EOF'
# TYPE  DATABASE  USER      ADDRESS     METHOD
local   all       postgres              peer
local   all       all                   peer
host    all       all       0.0.0.0/0   scram-sha-256
host    all       all       ::/0        scram-sha-256
EOF
    in_chroot chown postgres:postgres /etc/postgresql/15/main/pg_hba.conf \
        /etc/postgresql/15/main/conf.d/90-testhost.conf
    cat >"$R/etc/supervisor/conf.d/10-postgresql.conf" <<'EOF'
[program:postgresql]
command=/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main -c config_file=/etc/postgresql/15/main/postgresql.conf
user=postgres
; SIGINT is PostgreSQL's fast shutdown; SIGTERM (smart) would wait for every client to leave.
stopsignal=INT
stopwaitsecs=30
autorestart=true
redirect_stderr=true
stdout_logfile=/var/log/supervisor/postgresql.log
EOF
    # /run is a fresh tmpfs at every boot.
    cat >"$R/etc/testhost/boot.d/50-postgresql" <<'EOF'
#!/bin/sh
install -d -o postgres -g postgres -m 2775 /run/postgresql
EOF
    chmod 755 "$R/etc/testhost/boot.d/50-postgresql"
    cleanup
}

build_app() {
    prepare_chroot
    # shellcheck disable=SC2086
    apt_install $APP_PACKAGES
    # The package's own pgbouncer is not used: each environment runs one under supervisor.
    rm -f "$R/etc/pgbouncer/pgbouncer.ini" "$R/etc/pgbouncer/userlist.txt"
    cleanup
}

case "$VARIANT" in
base) build_base ;;
db) build_db ;;
app) build_app ;;
*)
    echo "usage: $0 base|db|app ROOT" >&2
    exit 2
    ;;
esac
echo "build-rootfs.sh: $VARIANT image ready in $R"
