# Prometheus from Debian's `prometheus` package on the offline base (CI's stack; Grafana has no
# Debian package and stays out of it). Context: a folder with os-packages.sh and debs/ (the
# .deb files base-image.sh downloads); with debs/ empty, apt fetches the package.
# Flags as for prom/prometheus: docker-compose.yml passes --config.file and --storage.tsdb.path.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY os-packages.sh /usr/local/sbin/os-packages
COPY debs/ /tmp/debs/
# runs as nobody, as prom/prometheus does
RUN os-packages prometheus \
    && mkdir -p /prometheus \
    && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
