#!/bin/sh
# A node of the cluster profile: the cluster's Erlang cookie from
# MDM_RABBITMQ_COOKIE (the same on every node; refused if unset), then RabbitMQ's
# own rabbitmq-server script as the rabbitmq user, in place of this shell (PID 1):
# it stops the node cleanly on SIGTERM (`docker-compose stop`). Not Debian's
# /usr/sbin/rabbitmq-server wrapper, which runs it under `su` and passes no signal
# on: the node then ignored SIGTERM until docker killed it (stop_grace_period).
# The node's name is rabbit@HOSTNAME (docker-compose sets each node's hostname to
# its service name).
set -eu
if [ "${#MDM_RABBITMQ_COOKIE}" -lt 20 ]; then
    echo "rabbitmq: set MDM_RABBITMQ_COOKIE (20+ letters and digits, the same on every node)" >&2
    exit 2
fi
umask 077
printf '%s' "$MDM_RABBITMQ_COOKIE" > /var/lib/rabbitmq/.erlang.cookie
chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie
chmod 0400 /var/lib/rabbitmq/.erlang.cookie
unset MDM_RABBITMQ_COOKIE
cd /var/lib/rabbitmq
exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    env HOME=/var/lib/rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server
