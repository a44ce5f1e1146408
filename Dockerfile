# The MDM server image: `docker-compose up` builds it (see docker-compose.yml), for
# the server and for broker-init, which runs `python -m mdm_server.broker.bootstrap`
# to write the server's MQTT user into the broker's dynamic-security config.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml ./
COPY agent_protocol ./agent_protocol
COPY privacy_filters ./privacy_filters
COPY mdm_server ./mdm_server
RUN pip install . \
    && useradd --system --no-create-home --uid 10001 mdm \
    && install -d -o mdm -g mdm -m 0700 /var/lib/mdm/keyring

USER mdm
ENV MDM_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
# Migrations are idempotent: every start brings the schema up to date, then serves.
CMD ["sh", "-c", "mdm-server migrate && exec mdm-server serve"]
