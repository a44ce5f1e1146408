"""Which policy shapes each device's telemetry, kept current while ingest runs."""
