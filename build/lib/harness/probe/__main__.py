"""`python -m harness.probe`: the measured link rates behind floor_s, as a table."""

from __future__ import annotations

from harness.probe.cli import main

if __name__ == "__main__":
    main()
