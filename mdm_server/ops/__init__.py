"""What operators watch: health (``/livez``, ``/readyz``), Prometheus metrics
(``MDM_METRICS_ADDR``) and the log format (``MDM_LOG_FORMAT``)."""
