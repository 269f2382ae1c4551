# Prometheus for `docker compose --profile monitoring`: Debian's package on the project's base
# image, so nothing is pulled but what the project's Dockerfile pulls already. Built from the
# docker/ folder alone; the configuration (docker/prometheus.yml) is mounted, not copied, so an
# edit needs a restart, not a build. Plain Dockerfile syntax, as the project's.
#
#   docker build -f docker/prometheus.Dockerfile -t amm-prometheus docker
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# policy-rc.d: the package's maintainer scripts must not start a daemon inside the build. The
# amm user (uid 10001, as in the project's image) is who owns the keys in the certs volume.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
    && chmod 755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && useradd --no-create-home --uid 10001 --user-group amm \
    && mkdir -p /prometheus \
    && chown amm:amm /prometheus

USER amm
EXPOSE 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/amm/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.listen-address=0.0.0.0:9090"]
