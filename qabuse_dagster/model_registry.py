"""MLflow tracking and registry for qabuse detectors.

Models are stored in the skops format, never pickle, and loaded back only through
this module: the skops types we trust are listed here, not read from the model
artifact, so a tampered artifact cannot widen them. Versions are addressed by
alias (``@champion``, ``@challenger``), never by stage.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qabuse_dagster import settings

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from models import IsolationForestDetector

logger = logging.getLogger(__name__)

EXPERIMENT = "qabuse-detectors"
MODEL_ARTIFACT = "detector"
#: The only non-default types a stored Isolation Forest needs; nothing else is loaded.
TRUSTED_SKOPS_TYPES = frozenset({"sklearn.tree._tree.Tree"})


class ModelNotFoundError(LookupError):
    """The registry has no model version under the requested alias."""


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, and how it was trained."""

    name: str
    version: str
    run_id: str
    threshold: float
    feature_names: tuple[str, ...]
    feature_service: str
    extrapolation_weight: float = 1.0

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class LoadedDetector:
    """A detector loaded from the registry, with the version it came from."""

    ref: ModelVersionRef
    detector: IsolationForestDetector


def configure(tracking_uri: str | None = None) -> MlflowClient:
    """Point MLflow at qabuse's tracking and registry store and return a client."""
    import mlflow

    settings.paths().mlflow.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str = EXPERIMENT) -> str:
    """The experiment's id, creating it with artifacts under ``QABUSE_HOME``."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(client.create_experiment(name, artifact_location=settings.mlflow_artifact_root()))


def run_url(run_id: str, experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def log_detector(
    detector: IsolationForestDetector,
    *,
    feature_names: tuple[str, ...],
    feature_service: str,
    input_example: pd.DataFrame,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    run_name: str,
    model_name: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[ModelVersionRef, str]:
    """Log a fitted detector as a new run and register it as a new model version.

    Returns:
        The registered version and the experiment id of its run.
    """
    import mlflow
    import sklearn
    import skops
    from mlflow.models import infer_signature

    client = configure(tracking_uri)
    experiment_id = ensure_experiment(client)
    name = model_name or settings.model_name()
    metadata = {
        "threshold": detector.threshold_,
        "feature_names": list(feature_names),
        "feature_service": feature_service,
        "detector": type(detector).__name__,
        "extrapolation_weight": detector.extrapolation_weight,
        "input_transform": "sign(x) * log1p(|x|)",
        "score_convention": "higher is more anomalous",
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics(dict(metrics))
        mlflow.set_tags({"qabuse.feature_service": feature_service})
        example = input_example[list(feature_names)]
        transformed = detector.transform(example.to_numpy(dtype=float))
        signature = infer_signature(example, detector.estimator_.score_samples(transformed))
        model_info = mlflow.sklearn.log_model(
            detector.estimator_,
            name=MODEL_ARTIFACT,
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
            skops_trusted_types=sorted(TRUSTED_SKOPS_TYPES),
            signature=signature,
            metadata=metadata,
            registered_model_name=name,
            # Stated, not inferred: inference re-imports the model in a subprocess (seconds).
            pip_requirements=[
                f"scikit-learn=={sklearn.__version__}",
                f"skops=={skops.__version__}",
            ],
        )
        run_id = run.info.run_id
    version = str(model_info.registered_model_version)
    client.set_model_version_tag(name, version, "threshold", repr(detector.threshold_))
    client.set_model_version_tag(name, version, "feature_names", json.dumps(list(feature_names)))
    client.set_model_version_tag(name, version, "feature_service", feature_service)
    client.set_model_version_tag(
        name, version, "extrapolation_weight", repr(detector.extrapolation_weight)
    )
    ref = ModelVersionRef(
        name=name,
        version=version,
        run_id=run_id,
        threshold=detector.threshold_,
        feature_names=tuple(feature_names),
        feature_service=feature_service,
        extrapolation_weight=detector.extrapolation_weight,
    )
    logger.info("registered %s version %s (run %s)", name, version, run_id)
    return ref, experiment_id


def set_alias(ref: ModelVersionRef, alias: str, tracking_uri: str | None = None) -> None:
    configure(tracking_uri).set_registered_model_alias(ref.name, alias, ref.version)


def resolve_alias(
    alias: str, model_name: str | None = None, tracking_uri: str | None = None
) -> ModelVersionRef:
    """The version behind ``alias``; ModelNotFoundError if there is none."""
    from mlflow.exceptions import MlflowException

    client = configure(tracking_uri)
    name = model_name or settings.model_name()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ModelNotFoundError(
            f"no version of model {name!r} has alias @{alias} in {settings.mlflow_tracking_uri()}"
            " (run `qabuse demo` or materialise champion_model first)"
        ) from exc
    tags = version.tags
    return ModelVersionRef(
        name=name,
        version=str(version.version),
        run_id=str(version.run_id),
        threshold=float(tags["threshold"]),
        feature_names=tuple(json.loads(tags["feature_names"])),
        feature_service=tags["feature_service"],
        extrapolation_weight=float(tags.get("extrapolation_weight", 1.0)),
    )


def load_detector(
    alias: str = settings.CHAMPION_ALIAS,
    model_name: str | None = None,
    tracking_uri: str | None = None,
) -> LoadedDetector:
    """Load the version behind ``alias`` from the registry, trusting only known skops types."""
    import mlflow
    import skops.io

    from models import IsolationForestDetector

    ref = resolve_alias(alias, model_name, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=tmp))
        model_file = local / "model.skops"
        untrusted = set(skops.io.get_untrusted_types(file=model_file))
        unexpected = untrusted - TRUSTED_SKOPS_TYPES
        if unexpected:
            raise ValueError(
                f"{ref.uri} holds types qabuse does not trust: {sorted(unexpected)}; "
                "refusing to load it"
            )
        estimator = skops.io.load(model_file, trusted=sorted(untrusted))
    detector = IsolationForestDetector.from_fitted(
        estimator, ref.threshold, len(ref.feature_names), ref.extrapolation_weight
    )
    return LoadedDetector(ref=ref, detector=detector)
