# The MDM server image: `docker-compose up` builds it (see docker-compose.yml), for
# the server; for migrate, which runs `mdm-server migrate --server-role mdm_server`
# as the database's superuser; and for broker-init, which runs `python -m
# mdm_server.broker.bootstrap` to write the server's MQTT user into the broker's
# dynamic-security config, then `python -m mdm_server.broker.purge` on mosquitto.db
# and `python -m mdm_server.broker.certs` for the broker's TLS CA and certificate.
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
# Only serve: migrations need a superuser, the server must not be one (it refuses to
# start as one). Run `mdm-server migrate --server-role NAME` as the superuser first
# (docker-compose's migrate service does).
CMD ["mdm-server", "serve"]
