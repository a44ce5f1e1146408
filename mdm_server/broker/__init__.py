"""Device identity on the broker: Mosquitto's dynamic-security plugin, driven by the server.

- :mod:`mdm_server.broker.bootstrap` writes the broker's first dynamic-security
  config (the server's own MQTT user and role, deny-by-default access); it is
  standard-library only, so ``scripts/broker`` runs it with any Python 3.
- :mod:`mdm_server.broker.purge` removes from the broker's ``mosquitto.db`` the
  retained and QoS 2 messages its config no longer admits (standard library only,
  run by ``scripts/broker`` before the broker starts).
- :mod:`mdm_server.broker.dynsec` sends commands over ``$CONTROL/dynamic-security/v1``.
- :mod:`mdm_server.broker.identity` derives each device's MQTT password, gives each
  device a broker client and role of its own, revokes, and reconciles the broker
  with the database.
"""

__all__: list[str] = []
