# One image for every service of docker-compose.yml: the AMM (`amm service`), the worker agents
# (`amm agent`) and the demo replay (`amm replay`). Plain Dockerfile syntax, no BuildKit-only
# features, so that older engines build it too.
#
#   docker build -t amm .                                        # from the package index
#   make wheelhouse && docker build -t amm .                     # from ./wheels, no index needed
#   docker build --build-arg BASE_IMAGE=my-registry/python:3.11 -t amm .

# Any image with python3 >= 3.11 (and its venv module), a POSIX shell and useradd.
ARG BASE_IMAGE=python:3.11-slim

# Stage 1 installs everything into a venv; only the venv reaches the final image (not the
# wheelhouse, sources or build tools' leftovers).
FROM ${BASE_IMAGE} AS build

# A folder of the build context. When it holds any wheel, pip installs from it alone
# (--no-index), for build hosts that cannot reach a package index; `make wheelhouse` fills it.
ARG WHEELHOUSE=wheels
# The project's extras to install: diagnostics brings the replay's plotting (pandas, matplotlib).
ARG EXTRAS=diagnostics

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A venv: works the same on the official Python images and on distribution images whose system
# Python refuses pip (PEP 668).
RUN python3 -m venv /opt/amm

# Dependencies first, in their own layer: rebuilt only when pyproject.toml or the wheels change.
COPY ${WHEELHOUSE}/ /tmp/wheelhouse/
COPY pyproject.toml scripts/image_requirements.py /tmp/build/
RUN python3 /tmp/build/image_requirements.py --pyproject /tmp/build/pyproject.toml ${EXTRAS} \
        > /tmp/build/requirements.txt \
    && if ls /tmp/wheelhouse/*.whl > /dev/null 2>&1; then \
           echo "installing from the wheelhouse only"; \
           set -- --no-index --find-links /tmp/wheelhouse; \
       fi \
    && /opt/amm/bin/python -m pip install "$@" --requirement /tmp/build/requirements.txt

# The project itself: its dependencies and build backend are all installed by now.
COPY pyproject.toml README.md /tmp/src/
COPY amm /tmp/src/amm
COPY amm_service /tmp/src/amm_service
COPY worker_agent /tmp/src/worker_agent
RUN /opt/amm/bin/python -m pip install --no-deps --no-build-isolation /tmp/src

# Stage 2: what runs.
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/amm/bin:$PATH \
    MPLBACKEND=Agg

# The mount points of docker-compose.yml's volumes, owned by amm so that new volumes are too.
RUN useradd --create-home --uid 10001 --user-group amm \
    && mkdir -p /data /out /certs /ca /client \
    && chown amm:amm /data /out /certs /ca /client \
    && chmod 700 /ca

COPY --from=build /opt/amm /opt/amm

# The demo's traces: `amm replay benchmarks/traces/...` runs from here.
WORKDIR /app
COPY benchmarks/traces /app/benchmarks/traces
COPY docker/demo.sh /usr/local/bin/amm-demo
COPY docker/certs.sh /usr/local/bin/amm-compose-certs

USER amm
# Both servers stop gracefully on SIGTERM: health NOT_SERVING, agents unregister, exit code 0.
STOPSIGNAL SIGTERM
EXPOSE 50051 50061 9051 9061 8787
CMD ["amm", "--help"]
