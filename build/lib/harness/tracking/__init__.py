"""MLflow tracking: ``client`` (one run, the store's location) and ``sweep`` (a Hydra multirun as a parent run)."""
