"""One job, whichever runner generates: the measuring loop (measure.py), the transformers reference it compares
with (reference.py), and the MLflow run around them (run.py)."""
