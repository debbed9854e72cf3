# The service image: one process per container (the cache is per process; scale with replicas,
# or with SECRETS_WORKERS processes per container).
#
# PYTHON_IMAGE is the only knob: the official image by default; any Debian-like image with
# Python >= 3.11 and its venv module works the same (devstack/containers.py builds one with
# mmdebstrap where no registry is reachable). Build from the repository's root:
#   docker build -t secrets-service .
#   docker build --build-arg PYTHON_IMAGE=secrets-local/debian:bookworm -t secrets-service .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md NOTICE ./
COPY client ./client
COPY schemas ./schemas
COPY events ./events
COPY secrets_client ./secrets_client
COPY service ./service
# Two wheels into one virtualenv: secrets-client (schemas, events, secrets_client) and the
# service built on it. The dev harness (devstack/) and the tests are not copied.
RUN python3 -m venv /opt/secrets \
 && /opt/secrets/bin/pip install --no-cache-dir --disable-pip-version-check ./client . \
 && /opt/secrets/bin/python -m compileall -q /opt/secrets >/dev/null

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/secrets /opt/secrets
# A numeric user with no passwd entry (nothing here needs one): non-root, and the same in every
# base image. The root filesystem can be read-only (compose runs it so): nothing is written
# but to /tmp, where HOME points.
USER 10001:10001
ENV PATH=/opt/secrets/bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
    SECRETS_HOST=0.0.0.0 SECRETS_PORT=8080
EXPOSE 8080
# HTTPS: mount the PEM certificate chain and its unencrypted key (readable by uid 10001) and set
# SECRETS_TLS_CERT and SECRETS_TLS_KEY; without both the service speaks plain HTTP. The
# healthcheck asks this process's /readyz (Vault and NATS answer) on its own loopback, over
# HTTPS when SECRETS_TLS_CERT is set, without checking the certificate (clients must).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 CMD ["python3", "-c", "import os,ssl,sys,urllib.request as u; t=bool(os.environ.get('SECRETS_TLS_CERT')); c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE; o=u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=c)); sys.exit(o.open(('https' if t else 'http') + '://127.0.0.1:' + os.environ.get('SECRETS_PORT', '8080') + '/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["secrets-service", "serve"]
