# syntax=docker/dockerfile:1
# outbox-relay image (BuildKit, the default builder):
#   docker build -t outbox-relay:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" --build-arg CREATED="$(date -u +%FT%TZ)" .
# Stage 1 installs the locked dependencies (requirements.lock: every file checked against its
# sha256 by pip --require-hashes) and the relay into the virtualenv /opt/relay; stage 2 copies
# that virtualenv onto a fresh base image from which pip, setuptools and wheel are removed.

# Base image. It should be pinned by digest:
# >>> PYTHON_DIGEST IS NOT FILLED IN: no registry was reachable where this file was written, and
# >>> a digest that nobody looked up is worse than none. Until it is set, builds use the tag.
# Look up the multi-platform index digest of the tag and pin it, here or per build:
#   docker buildx imagetools inspect python:3.11-slim-bookworm     (the "Digest:" line)
#   docker build --build-arg PYTHON_DIGEST=sha256:<64 hex> ...
# and update it with the base image's security releases.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG PYTHON_DIGEST=

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@${PYTHON_DIGEST}} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# A virtualenv without pip: the stage's own pip installs into it (pip --python).
RUN python -m venv --without-pip /opt/relay
COPY requirements.lock ./
# Exactly the locked versions, wheels only, each file checked against the lock's hashes; pip
# fails if any dependency is missing from the lock. setuptools is there only to build the relay
# below and goes afterwards.
RUN python -m pip --python /opt/relay/bin/python install \
        --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY relay ./relay
# The relay itself, offline and without dependencies (all locked above; the tools extra brings
# psutil for `relay demo` and `relay bench`), built with the locked setuptools.
RUN python -m pip --python /opt/relay/bin/python install \
        --no-index --no-deps --no-build-isolation ".[tools]" \
 && python -m pip --python /opt/relay/bin/python uninstall --yes setuptools \
 && python -m pip --python /opt/relay/bin/python check \
 && /opt/relay/bin/python -c "import psutil, relay.cli" \
 && test -x /opt/relay/bin/relay

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@${PYTHON_DIGEST}}
ARG PYTHON_IMAGE
ARG PYTHON_DIGEST
# Set by the build (see the top); VERSION must match pyproject.toml (a unit test checks it).
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Relays committed MySQL/MariaDB outbox rows to Kafka" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      org.opencontainers.image.base.digest="${PYTHON_DIGEST}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/relay/bin:$PATH
# No package installer at run time: pip, setuptools and wheel of the base image go, and so do
# the copies that ensurepip would install again.
RUN python -m pip uninstall --yes pip setuptools wheel \
 && rm -rf "$(python -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))')/_bundled" \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin relay
COPY --from=build /opt/relay /opt/relay
# Secrets are files in RELAY_SECRETS_DIR (default /run/secrets/relay), mounted at run time.
USER 10001:10001
# 9108/tcp: /metrics, /livez, /readyz (RELAY_HTTP__PORT).
# 9109/udp: wake-up datagrams, only with RELAY_WAKEUP__ENABLED=true (RELAY_WAKEUP__PORT).
EXPOSE 9108/tcp 9109/udp
ENTRYPOINT ["relay"]
CMD ["run"]
