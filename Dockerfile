# syntax=docker/dockerfile:1
# Slim and non-root. BASE can name a local image where no registry is reachable.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Behind a TLS-inspecting proxy, pass its CA bundle (mounted) to pip and uv; these are
# build arguments, so nothing of them reaches the image.
ARG PIP_CERT
ARG SSL_CERT_FILE
ENV UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_PYTHON_DOWNLOADS=never
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
WORKDIR /opt/blobferry
COPY pyproject.toml uv.lock README.md ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project
COPY daemon ./daemon
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-editable

FROM ${BASE}
RUN groupadd --system blobferry && useradd --system --gid blobferry --home-dir /var/lib/blobferry blobferry \
    && mkdir -p /var/lib/blobferry/jobs /var/lib/blobferry/state \
    && chown -R blobferry:blobferry /var/lib/blobferry
COPY --from=build /opt/blobferry/.venv /opt/blobferry/.venv
ENV PATH=/opt/blobferry/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BLOBFERRY_JOBS_DIR=/var/lib/blobferry/jobs \
    BLOBFERRY_STATE_DIR=/var/lib/blobferry/state
USER blobferry
VOLUME ["/var/lib/blobferry"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["blobferry"]
CMD ["run"]
