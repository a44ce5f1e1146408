#!/bin/sh
# Patroni's post_bootstrap (deploy/cluster/patroni.yml): once, on the node that
# initialised the cluster, as its superuser. $1 is the connection URL Patroni gives.
set -eu
psql "$1" -v ON_ERROR_STOP=1 -c 'CREATE DATABASE mdm'
