"""The link probe: measured link rates and decoder compute, cached per machine, and the per-token floor they imply."""
