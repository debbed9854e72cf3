"""The heart of the service: `SecretsManager` with its cache, coherence and listeners.

It knows nothing of HTTP or NATS; those are adapters around it."""

from service.core.manager import EventSink, Listener, SecretsManager

__all__ = ["EventSink", "Listener", "SecretsManager"]
