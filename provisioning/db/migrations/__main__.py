"""``python -m provisioning.db.migrations revision|heads`` (docs/database.md)."""

import sys

from provisioning.db.migrations import main

sys.exit(main())
