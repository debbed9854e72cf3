# Prometheus and promtool from Debian's prometheus package, laid out as the upstream
# prom/prometheus image: /bin/prometheus as the entrypoint, data in /prometheus, user nobody.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY prometheus promtool /bin/
RUN chmod 0755 /bin/prometheus /bin/promtool && mkdir -p /prometheus /etc/prometheus \
 && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
