"""Message bodies, one module per family; :mod:`agent.protocol.wire.messages.registry` maps types
to them."""
