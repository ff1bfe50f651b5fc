"""Compare layerbench runs logged to MLflow: `python -m harness.report` (see harness.report.cli)."""
