"""Message bodies, one module per family; :mod:`agent.wire.messages.registry` maps types to them."""
