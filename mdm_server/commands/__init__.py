"""Signed commands to devices: signing keys, the outbox and its dispatcher."""
