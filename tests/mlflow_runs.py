"""Reading a tracking store back: a plain MlflowClient, and an experiment's runs (for tests in any folder:
tests/, the rootdir conftest's folder, is on sys.path)."""

from __future__ import annotations

import mlflow


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


def _runs(client: mlflow.MlflowClient, experiment: str, filter_string: str = "") -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string))
