#!/bin/sh
# The compose `demo` service: `amm replay ARGS...` against the cluster, writing into /out.
#
# It runs as root so that it can write into the mounted ./out whoever owns it, then hands what
# is in /out to that folder's owner, so that the plot on the host belongs to the user who made
# the folder. The replay's exit code is the service's.
set -u
owner="$(stat -c %u:%g /out)"
status=0
amm replay "$@" || status=$?
chown -R "$owner" /out 2> /dev/null || true
exit "$status"
