"""The local key API: a Unix socket through which applications on the device use the agent's
keys without ever holding them. ``protocol`` (framing, strict request decoding), ``access``
(who may do what, from the configuration), ``server``, ``client``, ``cli`` (``keyagent api``).

Kept import-light on purpose: the configuration loader imports ``access`` and must not pull in
the server."""
