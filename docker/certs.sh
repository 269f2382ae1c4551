#!/bin/sh
# The compose `certs` service: the cluster's CA and identities, made once, then handed out.
#
# /ca (volume `ca`, mounted by this service only) is the certs folder: the CA with its key, where
# `docker compose run --rm certs amm certs issue|token|revoke /ca ...` manage identities. Every
# run of the service then publishes from it (`amm certs publish`, each file replaced atomically,
# so running servers pick up rotations and revocations):
#   /certs  (volume `certs`, read-only in the AMM and the agents): ca.pem, tokens, revoked and
#           the amm and agent identities, and the reader's (for Prometheus, which needs no
#           more), owned by amm; never the CA's key nor an operator's;
#   /client (./certs on the host): ca.pem and the operator and reader identities, given to that
#           folder's owner, for grpcurl, `AMM_TLS=certs amm ...` and the demo.
# Arguments go to `amm certs init` the first time (the --san names the AMM is reached by).
# It runs as root to hand /client to its owner, as the demo does with ./out. The AMM_CERTS_*
# variables are for testing it outside a container.
set -eu
ca="${AMM_CERTS_CA:-/ca}"
servers="${AMM_CERTS_SERVERS:-/certs}"
clients="${AMM_CERTS_CLIENTS:-/client}"
user="${AMM_CERTS_USER:-amm}"
if [ ! -f "$ca/ca.pem" ]; then
    amm certs init "$ca" "$@"
fi
owner="$(id -u "$user"):$(id -g "$user")"
chown -R "$owner" "$ca"
amm certs publish "$ca" "$servers" --role amm --role agent --role reader --owner "$owner"
amm certs publish "$ca" "$clients" --role operator --role reader --owner "$(stat -c %u:%g "$clients")"
