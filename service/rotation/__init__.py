"""Rotation: rules, generators, the PostgreSQL rotator, the coordinator."""
