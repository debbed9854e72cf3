"""The audit trail: one record per decided request, to a line sink and to NATS; never a value."""

from service.audit.log import AuditLog, LineSink

__all__ = ["AuditLog", "LineSink"]
