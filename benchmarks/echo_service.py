"""The BentoML floor under ``/score``: the scorer's request shape, answered without scoring.

``benchmarks.scoring`` serves it beside the real scorer (``bentoml serve
benchmarks.echo_service:Echo``) so that the scorer's latency is read against what BentoML,
pydantic validation and HTTP cost on this machine alone: no Feast, no MLflow, no model.
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from pydantic import Field

from qabuse_dagster.serving.schemas import HEX_ID_PATTERN
from qabuse_dagster.serving.server import scorer_workers


# The scorer's settings (its workers, QABUSE_SCORER_WORKERS, and timeout), so the two
# differ only in the work done.
@bentoml.service(name="qabuse_echo", workers=scorer_workers(), traffic={"timeout": 10})
class Echo:
    """Answers ``POST /score`` with the key it was sent."""

    @bentoml.api(route="/score")
    def score(
        self,
        api_key_id: Annotated[
            str,
            Field(
                pattern=HEX_ID_PATTERN,
                description="Keyed hash of the API key's id, validated as the scorer does.",
                examples=["0123456789abcdef" * 4],
            ),
        ],
    ) -> dict[str, Any]:
        """Echo the key with a constant score: the floor a real answer cannot go under."""
        return {"api_key_id": api_key_id, "score": 0.0, "anomalous": False}
