"""Alembic's entry point for keyfleet's migrations. keyfleet itself runs them through
``provisioning.db.migrations`` (``keyfleet db init`` / ``keyfleet db upgrade``), which hands
Alembic an open, locked connection; the ``alembic`` command line also works with
``-x url=DATABASE_URL`` (see docs/database.md)."""

from alembic import context

from provisioning.db.migrations import run_environment

run_environment(context)
