"""The MDM telemetry service: configuration, storage, ingest, HTTP API, CLI."""

__all__: list[str] = []
