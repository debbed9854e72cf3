"""What applications and people use to reach the secrets service: `SecretsClient` (blocking) and
`AsyncSecretsClient` over HTTP, with a cache kept fresh by the service's watch stream; the change
listener (NATS) and `secretsctl`. Imports no server dependency (no starlette, uvicorn, hvac,
prometheus-client).
"""

from events.listener import Change, ChangeListener, UnknownChange, decode_change
from secrets_client.aio import AsyncSecretsClient
from secrets_client.cache import CacheStats
from secrets_client.client import SecretsClient
from secrets_client.errors import ClientError

__all__ = [
    "AsyncSecretsClient",
    "CacheStats",
    "Change",
    "ChangeListener",
    "ClientError",
    "SecretsClient",
    "UnknownChange",
    "decode_change",
]
