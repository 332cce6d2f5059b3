# syntax=docker/dockerfile:1
# outbox-relay image: `docker build -t outbox-relay:0.1.0 .` (BuildKit, the default builder).
# Stage 1 builds the relay's wheel from pyproject.toml plus wheels for all its dependencies;
# stage 2 installs them offline from a bind mount, so no wheel or compiler lands in a layer.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Relays committed MySQL/MariaDB outbox rows to Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin relay
# --no-index: only the wheels built above (the relay's own wheel names its exact version).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels /wheels/outbox_relay-*.whl \
 && command -v relay
# Secrets are files in RELAY_SECRETS_DIR (default /run/secrets/relay), mounted at run time.
USER 10001:10001
# 9108/tcp: /metrics, /livez, /readyz (RELAY_HTTP__PORT).
# 9109/udp: wake-up datagrams, only with RELAY_WAKEUP__ENABLED=true (RELAY_WAKEUP__PORT).
EXPOSE 9108/tcp 9109/udp
ENTRYPOINT ["relay"]
CMD ["run"]
