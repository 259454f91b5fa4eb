#!/bin/sh
# Boot one isolated test host (see sandbox/testhosts.py). Started as
#
#   ip netns exec NETNS unshare --mount --uts --ipc --pid --fork --kill-child \
#       --propagation private init.sh LOWER HOSTDIR HOSTNAME
#
# so this script is PID 1 of a fresh PID namespace, in a private mount namespace, inside the
# host's network namespace. Every mount below lives only in that mount namespace: when the host's
# PID 1 dies, the kernel kills the rest of the host and the mounts (overlay included) go with it.
# Nothing is ever mounted in the machine's own namespace, so there is nothing to unmount.
#
# Not part of the image tag: editing this file does not rebuild the images.
set -eu

LOWER=$1
H=$2
NAME=$3
M=$H/merged

mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$H/upper,workdir=$H/work" "$M"
mount -t proc -o nosuid,nodev,noexec proc "$M/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$M/sys"

mount -t tmpfs -o mode=755,nosuid,nodev,size=64m tmpfs "$M/run"
mkdir -p "$M/run/sshd" "$M/run/lock"
chmod 1777 "$M/run/lock"

mount -t tmpfs -o mode=755,nosuid,size=16m tmpfs "$M/dev"
mknod -m 666 "$M/dev/null" c 1 3
mknod -m 666 "$M/dev/zero" c 1 5
mknod -m 666 "$M/dev/full" c 1 7
mknod -m 666 "$M/dev/random" c 1 8
mknod -m 666 "$M/dev/urandom" c 1 9
mknod -m 666 "$M/dev/tty" c 5 0
mkdir -m 755 "$M/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$M/dev/pts"
ln -s pts/ptmx "$M/dev/ptmx"
ln -s /proc/self/fd "$M/dev/fd"
ln -s /proc/self/fd/0 "$M/dev/stdin"
ln -s /proc/self/fd/1 "$M/dev/stdout"
ln -s /proc/self/fd/2 "$M/dev/stderr"
mkdir -m 1777 "$M/dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m tmpfs "$M/dev/shm"

hostname "$NAME"

ENV="/usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root"
# Per-image boot hooks (for example /run/postgresql on the db image).
if [ -d "$M/etc/testhost/boot.d" ]; then
    chroot "$M" $ENV run-parts --exit-on-error /etc/testhost/boot.d
fi

# sshd outside supervisor: ready at once (supervisord starts programs only after its first
# tick), and `supervisorctl stop all` in a runbook does not cut off SSH. It daemonizes.
chroot "$M" $ENV /usr/sbin/sshd

# supervisord becomes PID 1: it runs nginx (and postgresql on the db image) and reaps orphans.
exec chroot "$M" $ENV /usr/bin/supervisord -n -c /etc/supervisor/supervisord.conf
