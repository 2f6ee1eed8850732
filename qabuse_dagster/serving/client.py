"""A small HTTP client of the scoring endpoint."""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from qabuse_dagster.serving.schemas import BatchScoreResponse, ScoreResponse

DEFAULT_URL = "http://127.0.0.1:3001"


class ScoringError(RuntimeError):
    """The endpoint refused a request; carries its HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class ScoringClient:
    """Calls ``POST /score`` and ``POST /score/batch`` on a running ``qabuse serve``.

    Example:
        >>> client = ScoringClient("http://127.0.0.1:3001")  # doctest: +SKIP
        >>> client.score("0123456789abcdef").anomalous  # doctest: +SKIP
        False
        >>> client.score_batch(["0123456789abcdef"]).not_online  # doctest: +SKIP
        []
    """

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def score(self, api_key_id: str) -> ScoreResponse:
        response = self._http.post("/score", json={"api_key_id": api_key_id})
        if response.status_code != 200:
            raise ScoringError(response.status_code, response.text[:500])
        return ScoreResponse.model_validate(response.json())

    def score_batch(self, keys: Sequence[str | tuple[str, str | None]]) -> BatchScoreResponse:
        """Score many keys in one request: api key ids, or (api key id, user) pairs.

        At most `qabuse_dagster.serving.schemas.MAX_BATCH_KEYS` keys a call.
        """
        pairs = [(key, None) if isinstance(key, str) else key for key in keys]
        body = {"keys": [{"api_key_id": key, "user": user} for key, user in pairs]}
        response = self._http.post("/score/batch", json=body)
        if response.status_code != 200:
            raise ScoringError(response.status_code, response.text[:500])
        return BatchScoreResponse.model_validate(response.json())

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the endpoint answers ``/readyz``; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"scoring endpoint at {self.url} not ready after {timeout:.0f} s")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
