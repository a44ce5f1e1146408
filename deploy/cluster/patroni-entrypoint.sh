#!/bin/sh
# A Patroni node of the cluster profile: refuses to start without a replication
# password (MDM_PATRONI_REPLICATION_PASSWORD in docker-compose.yml, 16+ characters),
# then runs Patroni with deploy/cluster/patroni.yml.
set -eu
if [ "${#PATRONI_REPLICATION_PASSWORD}" -lt 16 ]; then
    echo "patroni: set MDM_PATRONI_REPLICATION_PASSWORD (16+ URL-safe characters)" >&2
    exit 2
fi
exec patroni /etc/patroni/patroni.yml
