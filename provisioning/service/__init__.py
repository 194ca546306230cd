"""``keyfleet serve``: the group delivery service over MQTT.

``core`` is the facade of the sans-I/O service (messages in, publishes out, the registry in
between) over one module per flow (see its docstring), ``store`` every query the service makes
(its own tables and its reads of the registry's), ``mqtt`` the adapter and runner that connects
it to the broker.
"""
