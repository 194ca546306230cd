"""``keyfleet serve``: the group delivery service over MQTT.

``core`` is the sans-I/O service (messages in, publishes out, the registry in between),
``store`` its own tables (operator keys, replay state, command ids), ``mqtt`` the adapter and
runner that connects it to the broker.
"""
