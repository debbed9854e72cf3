"""The audit trail: one record per decided request, never a value; `AuditLog` (log) queues,
confirms and publishes records to NATS, `LineSink` (sinks) writes them to a file or stdout."""

from service.audit.log import AuditLog
from service.audit.sinks import LineSink

__all__ = ["AuditLog", "LineSink"]
