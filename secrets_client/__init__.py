"""What applications and people use to reach the secrets service: `SecretsClient` (HTTP), the
change listener (NATS) and `secretsctl`. Imports no server dependency (no starlette, uvicorn,
hvac, prometheus-client)."""

from events.listener import Change, ChangeListener, UnknownChange, decode_change
from secrets_client.client import ClientError, SecretsClient

__all__ = [
    "Change",
    "ChangeListener",
    "ClientError",
    "SecretsClient",
    "UnknownChange",
    "decode_change",
]
