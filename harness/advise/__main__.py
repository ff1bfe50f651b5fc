"""`python -m harness.advise [job overrides] [advise.*]`: the ranking, and with advise.verify=N its check."""

from __future__ import annotations

import sys

from harness.advise.cli import main
from harness.compose import register_configs

if __name__ == "__main__":
    register_configs()
    sys.exit(main())
