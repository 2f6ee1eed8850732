"""The scoring endpoint: one BentoML service that scores an api key in milliseconds.

``POST /score {"api_key_id": "<hash>"}`` reads the key's online features from Feast,
scores them with the ``@champion`` detector from the MLflow registry
(`qabuse_dagster.serving.scoring`, as the stream worker does) and answers with
the score, the decision, the exact model version and the features it used, and how old
those features are: a vector older than ``QABUSE_ONLINE_MAX_AGE_S`` is scored but
answered with ``stale: true``. ``POST /score/batch {"keys": [{"api_key_id": ...}, ...]}``
scores up to `MAX_BATCH_KEYS` keys with one online read: each answer is the one
``/score`` gives for its key.

Run it with ``qabuse serve`` (``bentoml serve qabuse_dagster.serving.service:Scorer``);
``QABUSE_SCORER_WORKERS`` worker processes (default one per core, `scorer_workers`)
share the port.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Annotated, Any, cast

import bentoml
from bentoml.exceptions import NotFound, ServiceUnavailable
from pydantic import Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from qabuse_dagster import settings
from qabuse_dagster.serving.schemas import (
    MAX_BATCH_KEYS,
    ApiKeyId,
    BatchScoreResponse,
    ScoreRequest,
    ScoreResponse,
    UserId,
)
from qabuse_dagster.serving.scoring import (
    Champion,
    ChampionUnavailable,
    KeyNotOnline,
    score_key,
    score_keys,
)
from qabuse_dagster.serving.server import scorer_workers

logger = logging.getLogger(__name__)

EXAMPLE_KEY = "0123456789abcdef" * 4
#: The routes that take a JSON body.
JSON_ROUTES = frozenset({"/score", "/score/batch"})


class JSONBodiesOnly:
    """Refuses a ``/score`` (or batch) body that is not JSON with a 415, before BentoML parses it.

    BentoML also parses multipart and url-encoded forms and takes any other content type
    for JSON; its multipart parser's error (no boundary, a part over 1 MB) escapes as a 500.
    A request without a Content-Type is taken as JSON.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in JSON_ROUTES:
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


@bentoml.service(name="qabuse_scorer", workers=scorer_workers(), traffic={"timeout": 10})
class Scorer:
    """Scores api keys from their Feast online features with the @champion detector."""

    def __init__(self) -> None:
        settings.export_home()
        # One request scores one row: torch's intra-op threads only add handoffs (and
        # contend with the server's own on a small machine).
        import torch

        torch.set_num_threads(1)
        self.champion = Champion(settings.model_refresh_seconds())
        self.max_age = timedelta(seconds=settings.online_max_age_seconds())
        # Start anyway without a champion: /score answers 503 with the reason until one exists.
        with contextlib.suppress(ChampionUnavailable):
            self.champion.get()

    @bentoml.api(route="/score")
    def score(self, api_key_id: ApiKeyId, user: UserId = None) -> ScoreResponse:
        """Score one api key's current behaviour; higher scores are more anomalous."""
        loaded, store, inputs = self._champion()
        try:
            return score_key(loaded, store, inputs, api_key_id, user, max_age=self.max_age)
        except KeyNotOnline as exc:
            raise NotFound(str(exc)) from None

    @bentoml.api(route="/score/batch")
    def score_batch(
        self,
        keys: Annotated[
            list[ScoreRequest],
            Field(
                min_length=1,
                max_length=MAX_BATCH_KEYS,
                description=f"The keys to score, 1 to {MAX_BATCH_KEYS}; a key may repeat.",
                examples=[[{"api_key_id": EXAMPLE_KEY}]],
            ),
        ],
    ) -> BatchScoreResponse:
        """Score many api keys at once; each answer is what POST /score gives for its key."""
        loaded, store, inputs = self._champion()
        pairs = [(key.api_key_id, key.user) for key in keys]
        answers = score_keys(loaded, store, inputs, pairs, max_age=self.max_age)
        missing = [key for (key, _), answer in zip(pairs, answers, strict=True) if answer is None]
        return BatchScoreResponse(
            answers=[answer for answer in answers if answer is not None], not_online=missing
        )

    def _champion(self) -> tuple[Any, Any, Any]:
        try:
            return self.champion.get()
        except ChampionUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from None


# mypy keeps a decorated class's own type; bentoml.service made Scorer a bentoml.Service.
cast("bentoml.Service[Any]", Scorer).add_asgi_middleware(JSONBodiesOnly)
