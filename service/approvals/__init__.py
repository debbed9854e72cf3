"""Approvals: change requests for paths under `[[approvals.rules]]`, kept in Vault, applied with
CAS on the version they were made against; the 428 gate and break-glass bypass."""
