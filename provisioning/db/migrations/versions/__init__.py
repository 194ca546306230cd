"""Schema revisions, oldest first by ``down_revision``; see docs/database.md before adding one."""
