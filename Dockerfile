# derper: Tailscale DERP relay + STUN. Build:  docker build -t derper .
# Run (IP only, pinned self-signed certificate; the pin is printed in the log):
#   docker run -d --name derper -p 443:443 -p 80:80 -p 3478:3478/udp -v derper:/var/lib/derper \
#     -e DERP_DOMAIN=203.0.113.7 -e DERP_CERT_MODE=manual derper
# Ports below 1024 as a non-root user: Docker (20.10+) sets net.ipv4.ip_unprivileged_port_start=0
# in the container's own network namespace; podman needs
#   --sysctl net.ipv4.ip_unprivileged_port_start=0
# (with --network host, pick ports >= 1024 instead: -e DERP_ADDR=:8443 -e DERP_HTTP_PORT=-1).
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
# The venv is built here and copied: pip, wheel caches and build dependencies stay behind.
RUN python3 -m venv /opt/derper
COPY pyproject.toml README.md /src/
COPY derper /src/derper
COPY stun /src/stun
RUN /opt/derper/bin/pip install --no-cache-dir --disable-pip-version-check /src \
    && /opt/derper/bin/pip uninstall -y -q pip setuptools

FROM ${BASE}
COPY --from=build /opt/derper /opt/derper
COPY deploy/healthcheck.py /opt/derper/healthcheck.py
# A fixed uid, so a volume's ownership survives image upgrades.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/derper --no-create-home \
        --shell /usr/sbin/nologin derper \
    && mkdir -p /var/lib/derper/certs && chown -R derper:derper /var/lib/derper \
    && chmod 0700 /var/lib/derper
ENV PATH=/opt/derper/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DERP_CONFIG=/var/lib/derper/derper.key \
    DERP_CERT_DIR=/var/lib/derper/certs
# The server key and the certificates (self-signed, Let's Encrypt cache, or your own files).
VOLUME ["/var/lib/derper"]
USER derper
WORKDIR /var/lib/derper
EXPOSE 443 80 3478/udp
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/opt/derper/bin/python3", "/opt/derper/healthcheck.py"]
# derper handles SIGTERM itself as PID 1: Restarting frames to every client, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/derper/bin/derper"]
