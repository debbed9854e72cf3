# Prometheus and promtool from Debian's prometheus package, laid out as the upstream
# prom/prometheus image: /bin/prometheus as the entrypoint, data in /prometheus, user nobody.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY rootfs/ /
COPY --chown=65534:65534 rootfs/etc/prometheus/ /prometheus/
USER 65534:65534
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
