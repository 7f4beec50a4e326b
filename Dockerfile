# syntax=docker/dockerfile:1
#
# A dhtsignal bootstrap node.
#   docker build -t dhtsignal .
#   docker run -d --name boot1 -p 4000:4000/udp -v boot1-data:/data dhtsignal [--join HOST:PORT]...
# Arguments after the image name go to `dhtsignal bootstrap`; settings can also come from
# DHTSIGNAL_* environment variables (see configs/bootstrap.toml). See bootstrap/README.md.

# ---- builder: our wheel and the wheels of its dependencies ---------------------------------------
# Without the "webrtc" extra: a bootstrap node never loads aiortc or PyAV (about 100 MB).
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dhtsignal ./dhtsignal
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the wheels installed offline, a non-root user, one volume ---------------------------
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin dhtsignal \
    && mkdir -p /data && chown dhtsignal:dhtsignal /data && chmod 0700 /data
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels dhtsignal
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DHTSIGNAL_DATA_DIR=/data \
    DHTSIGNAL_LOG_LEVEL=info
USER dhtsignal
WORKDIR /data
VOLUME /data
EXPOSE 4000/udp
STOPSIGNAL SIGTERM
# Asks the node itself through its local API (the socket /data/api.sock, whatever port it was
# configured on): exit 0 with its routing table, records and counters, 1 if the daemon does
# not answer, 2 if it is not serving at all.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["dhtsignal", "status", "--daemon", "/data"]
# The node listens on 0.0.0.0:4000 (the default of `bootstrap`; DHTSIGNAL_LISTEN changes it).
ENTRYPOINT ["dhtsignal", "bootstrap"]
