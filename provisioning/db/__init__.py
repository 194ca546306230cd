"""The persistence layer at the bottom of the fleet service: engines and transactions
(``engine``), every table (``schema`` for the registry, ``runtime`` for what service instances
share while they work) and the Alembic migrations that create and upgrade them (``migrations``).

It imports nothing of the service, the registry repository or the CLI above it; the registry
(``provisioning.registry``) and the service's runtime store (``provisioning.service.store``) are
repositories over these tables, and only they and the enrollment flow hold SQL. The rule is an
import-linter contract (pyproject.toml).
"""
