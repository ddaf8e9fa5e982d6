"""Durable, encrypted quarantine store."""
