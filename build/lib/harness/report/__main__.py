"""`python -m harness.report`: the CLI lives in harness.report.cli."""

from __future__ import annotations

import sys

from harness.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
