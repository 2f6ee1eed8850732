"""MLflow tracking and registry for qabuse's detector families and the ensemble champion.

Each family (`models.registry`) is one registered model, ``qabuse-<family>``; the
ensemble champion is ``qabuse-api-key-detector`` (``QABUSE_MODEL_NAME``), whose version
pins the family versions it combines. A version's artifact is the directory the
family's own ``save`` writes (skops or safetensors and JSON: never pickle), and it is
loaded back only through the family's ``load``, which trusts only the types the family
names. Versions are addressed by alias (``@champion``, ``@challenger``), never by stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qabuse_dagster import settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from models import BaseDetector, EnsembleDetector

logger = logging.getLogger(__name__)

EXPERIMENT = "qabuse-detectors"
MODEL_ARTIFACT = "detector"
#: A promoted version's tag naming the @champion it replaced: what a rollback returns to.
PREVIOUS_CHAMPION_TAG = "qabuse.previous_champion"
#: The run artifact holding the version's drift reference (`evaluation.drift`).
DRIFT_REFERENCE_ARTIFACT = "drift_reference.json"
#: The ``family`` tag of the ensemble champion's versions.
ENSEMBLE_FAMILY = "ensemble"


def family_model_name(family: str) -> str:
    """The registered model of one family: ``qabuse-<family>`` (dashes for underscores)."""
    return f"qabuse-{family.replace('_', '-')}"


class ModelNotFoundError(LookupError):
    """The registry has no model version under the requested alias."""


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, and how it was trained."""

    name: str
    version: str
    run_id: str
    family: str
    threshold: float
    feature_names: tuple[str, ...]
    feature_service: str
    #: For the ensemble: member family -> its registered version.
    members: Mapping[str, str] = field(default_factory=dict)
    #: The Dagster run that trained it, when a Dagster asset did (alerts link to it).
    dagster_run_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class LoadedDetector:
    """A detector loaded from the registry, with the version it came from."""

    ref: ModelVersionRef
    detector: BaseDetector


@dataclass(frozen=True)
class LoadedChampion:
    """The ensemble champion and the member versions it pins, all loaded."""

    ref: ModelVersionRef
    ensemble: EnsembleDetector
    members: dict[str, LoadedDetector]


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
    detector: BaseDetector,
    *,
    family: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    run_name: str,
    model_name: str | None = None,
    members: Mapping[str, ModelVersionRef] | None = None,
    tracking_uri: str | None = None,
    dagster_run_id: str | None = None,
    drift_reference: Mapping[str, Any] | None = None,
) -> tuple[ModelVersionRef, str]:
    """Log a fitted detector as a new run and register it as a new model version.

    Args:
        detector: a fitted family detector, or the `EnsembleDetector` (family
            ``ensemble``, with ``members``: the registered versions it combines).
        family: the registry name of its family.
        params: run parameters.
        metrics: run metrics.
        run_name: the MLflow run's name.
        model_name: registered model (default `family_model_name`, or
            ``QABUSE_MODEL_NAME`` for the ensemble).
        members: for the ensemble, the member versions it pins.
        tracking_uri: the MLflow store (default the settings' one).
        dagster_run_id: the Dagster run training it, kept as the version's tag.
        drift_reference: the bins of its training inputs (`evaluation.drift`), logged as
            `DRIFT_REFERENCE_ARTIFACT`; later rows' drift is measured against them.

    Returns:
        The registered version and the experiment id of its run.
    """
    import mlflow

    client = configure(tracking_uri)
    experiment_id = ensure_experiment(client)
    if family == ENSEMBLE_FAMILY:
        from models.ensemble import save

        name = model_name or settings.model_name()
        feature_names: tuple[str, ...] = tuple(detector.members)  # type: ignore[attr-defined]
        feature_service = ""
        saver: Callable[[BaseDetector, Path], None] = save
    else:
        from models.registry import get_family

        spec = get_family(family)
        name = model_name or family_model_name(family)
        feature_names, feature_service, saver = spec.feature_names, spec.feature_service, spec.save
    pinned = {m: ref.version for m, ref in (members or {}).items()}
    tags = {
        "family": family,
        "threshold": repr(detector.threshold_),
        "feature_names": json.dumps(list(feature_names)),
        "feature_service": feature_service,
        "members": json.dumps(pinned),
        "score_convention": "higher is more anomalous",
        **({"dagster_run_id": dagster_run_id} if dagster_run_id else {}),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics(dict(metrics))
        mlflow.set_tags({"qabuse.family": family, "qabuse.feature_service": feature_service})
        with tempfile.TemporaryDirectory() as tmp:
            saver(detector, Path(tmp))
            mlflow.log_artifacts(tmp, MODEL_ARTIFACT)
        if drift_reference is not None:
            mlflow.log_dict(dict(drift_reference), DRIFT_REFERENCE_ARTIFACT)
        source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
        run_id = run.info.run_id
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(name, tags={"family": family})
    version = str(client.create_model_version(name, source, run_id, tags=tags).version)
    ref = ModelVersionRef(
        name=name,
        version=version,
        run_id=run_id,
        family=family,
        threshold=float(detector.threshold_),
        feature_names=tuple(feature_names),
        feature_service=feature_service,
        members=pinned,
        dagster_run_id=dagster_run_id,
    )
    logger.info("registered %s version %s (run %s)", name, version, run_id)
    return ref, experiment_id


#: Where the champion's hourly figures go: one run per champion version.
MONITORING_EXPERIMENT = "qabuse-continuous-evaluation"
#: The tag naming the version a continuous-evaluation run follows (``name vN``).
MONITORED_VERSION_TAG = "qabuse.monitored_version"


def log_window_metrics(
    ref: ModelVersionRef,
    metrics: Mapping[str, float],
    at_ms: int,
    tracking_uri: str | None = None,
) -> tuple[str, str, dict[str, list[tuple[int, float]]]]:
    """Add one window's figures to the time series of ``ref``'s continuous evaluation.

    The series lives in one MLflow run per model version, under `MONITORING_EXPERIMENT`;
    each figure is logged at step ``at_ms // 3_600_000`` (the window's hour), stamped
    ``at_ms``, so re-evaluating a window adds a point at the same step.

    Returns:
        The run's id, its experiment's id and, per figure, its whole series as
        ``(at_ms, value)`` in time order.
    """
    from mlflow.entities import Metric

    client = configure(tracking_uri)
    experiment_id = ensure_experiment(client, MONITORING_EXPERIMENT)
    version = f"{ref.name} v{ref.version}"
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MONITORED_VERSION_TAG}` = '{version}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(
            experiment_id,
            run_name=f"continuous-{ref.name}-v{ref.version}",
            tags={MONITORED_VERSION_TAG: version, "qabuse.model_run_id": ref.run_id},
        ).info.run_id
    step = at_ms // 3_600_000
    client.log_batch(
        run_id,
        metrics=[Metric(name, float(value), at_ms, step) for name, value in metrics.items()],
    )
    series = {
        name: sorted((m.timestamp, m.value) for m in client.get_metric_history(run_id, name))
        for name in metrics
    }
    return run_id, experiment_id, series


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
            " (run `qabuse demo` or materialise the models group first)"
        ) from exc
    return _ref(name, version)


def resolve_version(name: str, version: str, tracking_uri: str | None = None) -> ModelVersionRef:
    """Version ``version`` of registered model ``name``; ModelNotFoundError if it has none."""
    from mlflow.exceptions import MlflowException

    try:
        found = configure(tracking_uri).get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotFoundError(f"model {name!r} has no version {version!r}") from exc
    return _ref(name, found)


def promote(
    version: str, model_name: str | None = None, tracking_uri: str | None = None
) -> tuple[ModelVersionRef | None, ModelVersionRef]:
    """Move @champion of the served model to ``version``: the scorers follow the alias.

    The promoted version is tagged with the champion it replaces (`PREVIOUS_CHAMPION_TAG`),
    which is where `rollback` returns. Promoting the current champion changes nothing.

    Returns:
        The champion before (None when there was none) and the one now.

    Raises:
        ModelNotFoundError: the version does not exist.
        ValueError: the version is a single family's detector, not the served ensemble.
    """
    client = configure(tracking_uri)
    name = model_name or settings.model_name()
    new = resolve_version(name, version, tracking_uri)
    if new.family != ENSEMBLE_FAMILY:
        raise ValueError(f"{name} v{version} is a {new.family} detector, not the ensemble")
    previous: ModelVersionRef | None
    try:
        previous = resolve_alias(settings.CHAMPION_ALIAS, name, tracking_uri)
    except ModelNotFoundError:
        previous = None
    if previous is not None and previous.version == new.version:
        return previous, new
    if previous is not None:
        client.set_model_version_tag(name, new.version, PREVIOUS_CHAMPION_TAG, previous.version)
    client.set_registered_model_alias(name, settings.CHAMPION_ALIAS, new.version)
    logger.info("@%s of %s: v%s", settings.CHAMPION_ALIAS, name, new.version)
    return previous, new


def rollback(
    model_name: str | None = None, tracking_uri: str | None = None
) -> tuple[ModelVersionRef, ModelVersionRef]:
    """Move @champion back to the version the current champion replaced.

    Returns:
        The champion before and the one now.

    Raises:
        ModelNotFoundError: there is no champion, or it replaced none (it was the first).
    """
    client = configure(tracking_uri)
    name = model_name or settings.model_name()
    current = resolve_alias(settings.CHAMPION_ALIAS, name, tracking_uri)
    earlier = client.get_model_version(name, current.version).tags.get(PREVIOUS_CHAMPION_TAG)
    if not earlier:
        raise ModelNotFoundError(
            f"{name} v{current.version} (@{settings.CHAMPION_ALIAS}) replaced no earlier "
            "champion: there is nothing to roll back to"
        )
    target = resolve_version(name, earlier, tracking_uri)
    client.set_registered_model_alias(name, settings.CHAMPION_ALIAS, target.version)
    logger.info("@%s of %s rolled back: v%s", settings.CHAMPION_ALIAS, name, target.version)
    return current, target


def _ref(name: str, version: Any) -> ModelVersionRef:
    tags = version.tags
    if "family" not in tags:
        raise ModelNotFoundError(
            f"{name} v{version.version} predates detector families (no 'family' tag): "
            "retrain with the models group"
        )
    return ModelVersionRef(
        name=name,
        version=str(version.version),
        run_id=str(version.run_id),
        family=tags["family"],
        threshold=float(tags["threshold"]),
        feature_names=tuple(json.loads(tags["feature_names"])),
        feature_service=tags.get("feature_service", ""),
        members=json.loads(tags.get("members", "{}")),
        dagster_run_id=tags.get("dagster_run_id"),
    )


def _load(ref: ModelVersionRef) -> Any:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=tmp))
        if ref.family == ENSEMBLE_FAMILY:
            from models.ensemble import load

            return load(local)
        from models.registry import get_family

        return get_family(ref.family).load(local)


def load_drift_reference(
    ref: ModelVersionRef, tracking_uri: str | None = None
) -> dict[str, Any] | None:
    """The drift reference logged with ``ref``'s run, or None when it has none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure(tracking_uri)
    try:
        return dict(mlflow.artifacts.load_dict(f"runs:/{ref.run_id}/{DRIFT_REFERENCE_ARTIFACT}"))
    except (MlflowException, OSError):
        return None


def load_detector(
    alias: str = settings.CHAMPION_ALIAS,
    model_name: str | None = None,
    tracking_uri: str | None = None,
) -> LoadedDetector:
    """Load the version behind ``alias`` through its family's own loader (no pickle)."""
    ref = resolve_alias(alias, model_name, tracking_uri)
    return LoadedDetector(ref=ref, detector=_load(ref))


def load_champion(
    alias: str = settings.CHAMPION_ALIAS,
    model_name: str | None = None,
    tracking_uri: str | None = None,
) -> LoadedChampion:
    """The ensemble behind ``alias`` and each member version it pins."""
    ref = resolve_alias(alias, model_name, tracking_uri)
    if ref.family != ENSEMBLE_FAMILY:
        raise ModelNotFoundError(f"{ref.uri} is a {ref.family} detector, not the ensemble")
    members = {}
    for family, version in ref.members.items():
        member = resolve_version(family_model_name(family), version, tracking_uri)
        members[family] = LoadedDetector(ref=member, detector=_load(member))
    return LoadedChampion(ref=ref, ensemble=_load(ref), members=members)
