# The service image: one process per container (the cache is per process; scale with replicas).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md NOTICE ./
COPY client ./client
COPY schemas ./schemas
COPY events ./events
COPY secrets_client ./secrets_client
COPY service ./service
# Two wheels: secrets-client (schemas, events, secrets_client) and the service built on it. The
# dev harness (devstack/) and the tests are not copied: no launcher ships in the image.
RUN pip install --no-cache-dir --prefix=/install ./client .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 secrets && mkdir -p /etc/secrets-service/tls
USER secrets
ENV SECRETS_HOST=0.0.0.0 SECRETS_PORT=8080
EXPOSE 8080
# HTTPS: mount the PEM certificate chain and its unencrypted key (readable by uid 10001) at
# /etc/secrets-service/tls/ and set
#   SECRETS_TLS_CERT=/etc/secrets-service/tls/tls.crt SECRETS_TLS_KEY=/etc/secrets-service/tls/tls.key
# Without both the service speaks plain HTTP. The healthcheck follows SECRETS_TLS_CERT; it checks
# this process on its own loopback, so it does not verify the certificate (clients must).
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import os,ssl,sys,urllib.request as u; t=bool(os.environ.get('SECRETS_TLS_CERT')); c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE; o=u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=c)); sys.exit(o.open(('https' if t else 'http') + '://127.0.0.1:' + os.environ.get('SECRETS_PORT', '8080') + '/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["secrets-service", "serve"]
