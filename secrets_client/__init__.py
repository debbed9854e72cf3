"""What applications and people use to reach the secrets service: the change listener and
`secretsctl`. Imports no server dependency (no starlette, uvicorn, hvac, prometheus-client)."""

from events.listener import Change, ChangeListener, UnknownChange, decode_change

__all__ = ["Change", "ChangeListener", "UnknownChange", "decode_change"]
