"""Examples built on the service's public surface, outside every wheel: run from a checkout.

`examples.webhook_notifier`: approval events from NATS to a chat or HTTP webhook.
"""
