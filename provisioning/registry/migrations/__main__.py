"""``python -m provisioning.registry.migrations revision|heads`` (docs/database.md)."""

import sys

from provisioning.registry.migrations import main

sys.exit(main())
