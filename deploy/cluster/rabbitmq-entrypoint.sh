#!/bin/sh
# A node of the cluster profile: the cluster's Erlang cookie from
# MDM_RABBITMQ_COOKIE (the same on every node; refused if unset), then Debian's
# rabbitmq-server, which drops root for the rabbitmq user. The node's name is
# rabbit@HOSTNAME (docker-compose sets each node's hostname to its service name).
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
exec /usr/sbin/rabbitmq-server
