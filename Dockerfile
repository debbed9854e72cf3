# The service image: one process per container (the cache is per process; scale with replicas).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md NOTICE ./
COPY service ./service
COPY events ./events
COPY schemas ./schemas
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 secrets
USER secrets
ENV SECRETS_HOST=0.0.0.0 SECRETS_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
ENTRYPOINT ["secrets-service", "serve"]
