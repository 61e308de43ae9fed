# syntax=docker/dockerfile:1
# ollama-mirror in a container.
#
#   docker build -t ollama-mirror .
#   docker run -d -p 11434:11434 -v ollama-mirror-cache:/var/cache/ollama-mirror ollama-mirror
#
# Configuration: OLLAMA_MIRROR_* environment variables (README, "Configuration"), or a JSON file mounted
# read-only and named with `--config`, e.g. `-v ./mirror.json:/etc/ollama-mirror/mirror.json:ro` and
# `... ollama-mirror serve --config /etc/ollama-mirror/mirror.json`.  Logs go to standard output
# (rotate them with the container runtime's log driver, see docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for the package and its dependencies ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY ollama_mirror ./ollama_mirror
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[cluster]'

# --- run -------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OLLAMA_MIRROR_CACHE_DIR=/var/cache/ollama-mirror
# twistd finds its plugins through twisted/plugins/dropin.cache; site-packages is not writable at run
# time, so the cache is written here (else every start rescans and logs "Unable to write to plugin
# cache"); `twistd ollama-mirror --help` then proves that twistd finds the plugin.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'ollama-mirror[cluster]' \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd ollama-mirror --help > /dev/null \
    && groupadd --system --gid 10001 ollama-mirror \
    && useradd --system --uid 10001 --gid ollama-mirror --home-dir /var/cache/ollama-mirror \
       --no-create-home --shell /usr/sbin/nologin ollama-mirror \
    && install -d -o ollama-mirror -g ollama-mirror -m 0750 /var/cache/ollama-mirror

USER ollama-mirror:ollama-mirror
WORKDIR /var/cache/ollama-mirror
VOLUME ["/var/cache/ollama-mirror"]
EXPOSE 11434

# /mirror/health answers 503 only when the mirror cannot do its job (cache not writable); an
# unreachable upstream is "degraded" and still healthy: cached models keep being served.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["ollama-mirror", "health", "--mirror", "http://127.0.0.1:11434", "--timeout", "8"]

# SIGTERM stops the daemon cleanly (downloads in progress keep their finished chunks and resume).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ollama-mirror"]
CMD ["serve"]
