"""The service's app for granian (`granian --interface asgi granian_app:app`), configured by the
SECRETS_* environment as `secrets-service serve` is: for bench/workers_bench.py --granian only."""

from __future__ import annotations

import os

from service.http.app import create_app
from service.obs.logs import configure_logging
from service.settings import Settings

settings = Settings.from_environ(os.environ)
configure_logging(settings.log_level)
app = create_app(settings)
