"""The scoring endpoint: one BentoML service that scores an api key in milliseconds.

``POST /score {"api_key_id": "<hash>"}`` reads the key's online features from Feast,
scores them with the ``@champion`` detector from the MLflow registry and answers with
the score, the decision, the exact model version and the features it used, and how old
those features are: a vector older than ``QABUSE_ONLINE_MAX_AGE_S`` is scored but
answered with ``stale: true``.

Run it with ``qabuse serve`` (``bentoml serve qabuse_dagster.serving.service:Scorer``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from datetime import timedelta
from typing import Annotated, Any, cast

import bentoml
import numpy as np
from bentoml.exceptions import NotFound, ServiceUnavailable
from pydantic import Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from qabuse_dagster import settings
from qabuse_dagster.serving.schemas import HEX_ID_PATTERN, ScoreResponse

logger = logging.getLogger(__name__)

EXAMPLE_KEY = "0123456789abcdef" * 4


class _Champion:
    """The @champion ensemble, its member families and their online inputs, loaded once.

    Every ``refresh_s`` seconds a request asks the registry which version @champion
    names (one small query); when it changed, that version and the member versions it
    pins are loaded before scoring, so a promotion reaches the endpoint without a
    restart and every answer names the version that produced it.
    """

    def __init__(self, refresh_s: float) -> None:
        self._lock = threading.Lock()
        self.refresh_s = refresh_s
        self.loaded: Any = None
        self.store: Any = None
        self.inputs: Any = None
        self.error: str | None = None
        self._checked = 0.0

    def get(self) -> tuple[Any, Any, Any]:
        with self._lock:
            stale = time.monotonic() - self._checked > self.refresh_s
            if self.loaded is None or stale:
                self._load()
            if self.loaded is None:
                raise ServiceUnavailable(f"no model to score with: {self.error}")
            return self.loaded, self.store, self.inputs

    def _load(self) -> None:
        from qabuse_dagster.features.store import open_store
        from qabuse_dagster.model_registry import ModelNotFoundError, load_champion, resolve_alias
        from qabuse_dagster.serving.online import OnlineInputs

        self._checked = time.monotonic()
        try:
            current = self.loaded.ref.version if self.loaded is not None else None
            if current is not None and resolve_alias(settings.CHAMPION_ALIAS).version == current:
                return
            loaded = load_champion(settings.CHAMPION_ALIAS)
            if self.store is None:
                self.store = open_store()
            # Registry changes (a new feature service) are picked up with the new model.
            self.store.refresh_registry()
            inputs = OnlineInputs.resolve(self.store, loaded)
            inputs.warm_up({name: member.detector for name, member in loaded.members.items()})
            self.inputs, self.loaded, self.error = inputs, loaded, None
            # What is loaded now lives as long as the model: keep the collector from
            # walking it at every full collection (a pause in some request's latency).
            gc.freeze()
            logger.info("serving %s v%s", loaded.ref.name, loaded.ref.version)
        except ModelNotFoundError as exc:
            # Keep serving the model in hand, if any; report why there is none otherwise.
            self.error = str(exc)
            logger.error("%s", exc)


class JSONBodiesOnly:
    """Refuses a ``/score`` body that is not JSON with a 415, before BentoML parses it.

    BentoML also parses multipart and url-encoded forms and takes any other content type
    for JSON; its multipart parser's error (no boundary, a part over 1 MB) escapes as a 500.
    A request without a Content-Type is taken as JSON.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/score":
            content_type = dict(scope["headers"]).get(b"content-type", b"application/json")
            media_type = content_type.split(b";")[0].strip().lower().decode("latin-1")
            if media_type != "application/json":
                refusal = JSONResponse(
                    {"error": f"unsupported content type {media_type!r}: send application/json"},
                    status_code=415,
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


@bentoml.service(name="qabuse_scorer", workers=1, traffic={"timeout": 10})
class Scorer:
    """Scores api keys from their Feast online features with the @champion detector."""

    def __init__(self) -> None:
        settings.export_home()
        # One request scores one row: torch's intra-op threads only add handoffs (and
        # contend with the server's own on a small machine).
        import torch

        torch.set_num_threads(1)
        self.champion = _Champion(settings.model_refresh_seconds())
        self.max_age = timedelta(seconds=settings.online_max_age_seconds())
        # Start anyway without a champion: /score answers 503 with the reason until one exists.
        with contextlib.suppress(ServiceUnavailable):
            self.champion.get()

    @bentoml.api(route="/score")
    def score(
        self,
        api_key_id: Annotated[
            str,
            Field(
                pattern=HEX_ID_PATTERN,
                description="Keyed hash of the API key's id, as in the telemetry contract.",
                examples=[EXAMPLE_KEY],
            ),
        ],
        user: Annotated[
            str | None,
            Field(
                pattern=HEX_ID_PATTERN,
                description="Keyed hash of the submitting user, when the caller knows it: "
                "the user-level family then scores the user's rows too.",
                json_schema_extra={"nullable": True},
            ),
        ] = None,
    ) -> ScoreResponse:
        """Score one api key's current behaviour; higher scores are more anomalous."""
        loaded, store, inputs = self.champion.get()
        ref = loaded.ref
        online = inputs.read(store, api_key_id, user, max_age=self.max_age)
        if not online.known:
            raise NotFound(
                f"api key {api_key_id} has no online features: it is unknown, or has not "
                "submitted since the last materialisation"
            )
        raw = {
            name: float(inputs.score(name, member.detector, online))
            for name, member in loaded.members.items()
        }
        matrix = np.array([[raw[name] for name in loaded.ensemble.members]])
        standardised = loaded.ensemble.standardise(matrix)[0]
        score = float(loaded.ensemble.decision_function(matrix)[0])
        top = str(loaded.ensemble.members[int(standardised.argmax())])
        contributions = inputs.explain(top, loaded.members[top].detector, online)
        return ScoreResponse(
            api_key_id=api_key_id,
            score=score,
            anomalous=score > ref.threshold,
            threshold=ref.threshold,
            model_name=ref.name,
            model_version=ref.version,
            feature_service=",".join(inputs.services),
            family_scores=raw,
            family_standardised={
                name: float(z)
                for name, z in zip(loaded.ensemble.members, standardised, strict=True)
            },
            family_versions={name: m.ref.version for name, m in loaded.members.items()},
            top_family=top,
            top_features=contributions,
            features=online.scalars,
            # Fails open: a vector older than the bound is still scored, and flagged.
            stale=online.stale,
            feature_age_s=online.age_s,
        )


# mypy keeps a decorated class's own type; bentoml.service made Scorer a bentoml.Service.
cast("bentoml.Service[Any]", Scorer).add_asgi_middleware(JSONBodiesOnly)
