"""Scoring one api key with the ``@champion``: the body of ``/score`` and of the stream worker.

`Champion` loads the ensemble behind ``@champion``, its member families and their online
inputs once, and follows the alias when it moves; `score_key` reads the key's (and its
user's) online features and scores them with every member, as the endpoint answers;
`score_keys` does so for many keys with one online read (``POST /score/batch``).
Both ``POST /score`` (`qabuse_dagster.serving.service`) and the stream worker
(`qabuse_dagster.serving.stream_worker`) call these, so a decision taken from the stream
reads exactly like an answer of the endpoint.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from qabuse_dagster import settings
from qabuse_dagster.features.definitions import has_demand
from qabuse_dagster.serving.schemas import ScoreResponse

if TYPE_CHECKING:
    from qabuse_dagster.serving.online import OnlineRead

__all__ = ["Champion", "ChampionUnavailable", "KeyNotOnline", "score_key", "score_keys"]

logger = logging.getLogger(__name__)


class ChampionUnavailable(RuntimeError):
    """No ``@champion`` could be loaded (none is registered yet, or it failed to load)."""


class KeyNotOnline(LookupError):
    """The online store holds no features for the api key."""


class Champion:
    """The @champion ensemble, its member families and their online inputs, loaded once.

    Every ``refresh_s`` seconds a caller asks the registry which version @champion names
    (one small query); when it changed, that version and the member versions it pins are
    loaded before scoring, so a promotion reaches the scorer without a restart and every
    score names the version that produced it.

    Args:
        refresh_s: How often to ask the registry whether @champion moved.
        store: The Feast store to read online features from; default one opened
            (`qabuse_dagster.features.store.open_store`) at the first load.
    """

    def __init__(self, refresh_s: float, store: Any = None) -> None:
        self._lock = threading.Lock()
        self.refresh_s = refresh_s
        self.loaded: Any = None
        self.store: Any = store
        self.inputs: Any = None
        self.error: str | None = None
        self._checked = 0.0

    def get(self) -> tuple[Any, Any, Any]:
        """The loaded champion, the store and the resolved online inputs.

        Raises:
            ChampionUnavailable: No champion has been loaded; the message says why.
        """
        with self._lock:
            stale = time.monotonic() - self._checked > self.refresh_s
            if self.loaded is None or stale:
                self._load()
            if self.loaded is None:
                raise ChampionUnavailable(f"no model to score with: {self.error}")
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
            logger.info("scoring with %s v%s", loaded.ref.name, loaded.ref.version)
        except ModelNotFoundError as exc:
            # Keep scoring with the model in hand, if any; report why there is none otherwise.
            self.error = str(exc)
            logger.error("%s", exc)


def score_key(
    loaded: Any,
    store: Any,
    inputs: Any,
    api_key_id: str,
    user: str | None = None,
    *,
    max_age: timedelta,
    overlay: tuple[Mapping[str, Any], Mapping[str, Any] | None] | None = None,
) -> ScoreResponse:
    """Score one api key's current online features with every member of the champion.

    Args:
        loaded: The champion (`qabuse_dagster.model_registry.LoadedChampion`), as
            `Champion.get` gives it with ``store`` and ``inputs``.
        store: The Feast store.
        inputs: The champion's online inputs (`qabuse_dagster.serving.online.OnlineInputs`).
        api_key_id: The key to score.
        user: The key's user, when known: the user-level family then scores the user's rows.
        max_age: Features older than this are scored all the same, and flagged ``stale``.
        overlay: A row of the key's features and one of its user's (or None) that take
            the place of the online values they name: the stream worker's provisional
            rows of a minute still open, which never go to the online store.

    Returns:
        The score (higher is more anomalous), the verdict, the exact model version, each
        family's score and version, what drove the top family, and the features used.

    Raises:
        KeyNotOnline: The online store holds no features for ``api_key_id``.
    """
    online = inputs.read(store, api_key_id, user, max_age=max_age)
    if overlay is not None:
        online = _overlaid(online, *overlay)
    if not online.known:
        raise KeyNotOnline(
            f"api key {api_key_id} has no online features: it is unknown, or has not "
            "submitted since the last materialisation"
        )
    return _answer(loaded, inputs, api_key_id, online)


def score_keys(
    loaded: Any,
    store: Any,
    inputs: Any,
    keys: Sequence[tuple[str, str | None]],
    *,
    max_age: timedelta,
) -> list[ScoreResponse | None]:
    """`score_key` of each (api key, user or None) pair, read from the store in one go.

    Each key is scored on its own, as `score_key` scores it, so each answer is the one
    ``POST /score`` gives for that key; the batch shares the online read and the request.

    Returns:
        One answer per pair, in order; None for a key the online store holds nothing for.
    """
    # A pair asked for twice is read and scored once: the same read gives the same answer.
    unique = list(dict.fromkeys(keys))
    reads = inputs.read_many(store, unique, max_age=max_age)
    answers = {
        pair: _answer(loaded, inputs, pair[0], online) if online.known else None
        for pair, online in zip(unique, reads, strict=True)
    }
    return [answers[pair] for pair in keys]


def _answer(loaded: Any, inputs: Any, api_key_id: str, online: OnlineRead) -> ScoreResponse:
    """Score one key's online read with every member; the answer of ``/score``."""
    ref = loaded.ref
    raw = {
        name: float(inputs.score(name, member.detector, online))
        for name, member in loaded.members.items()
    }
    matrix = np.array([[raw[name] for name in loaded.ensemble.members]])
    standardised = loaded.ensemble.standardise(matrix)[0]
    score = float(loaded.ensemble.decision_function(matrix)[0])
    top = str(loaded.ensemble.members[int(standardised.argmax())])
    contributions = inputs.explain(top, loaded.members[top].detector, online)
    scalars = online.scalars  # a property that builds the dict: once per answer
    demand = bool(has_demand(scalars))
    return ScoreResponse(
        api_key_id=api_key_id,
        score=score,
        anomalous=demand and score > ref.threshold,
        threshold=ref.threshold,
        model_name=ref.name,
        model_version=ref.version,
        feature_service=inputs.feature_service,
        family_scores=raw,
        family_standardised={
            name: float(z) for name, z in zip(loaded.ensemble.members, standardised, strict=True)
        },
        family_versions={name: m.ref.version for name, m in loaded.members.items()},
        top_family=top,
        top_features=contributions,
        features=scalars,
        demand=demand,
        # Fails open: a vector older than the bound is still scored, and flagged.
        stale=online.stale,
        feature_age_s=online.age_s,
        batch_feature_age_s=online.batch_age_s,
    )


def _overlaid(
    online: OnlineRead, key_row: Mapping[str, Any], user_row: Mapping[str, Any] | None
) -> OnlineRead:
    """``online`` with the values ``key_row`` and ``user_row`` hold for its features."""
    from qabuse_dagster.serving.online import OnlineRead

    values = {name: key_row.get(name, v) for name, v in online.values.items()}
    user_values = online.user_values
    if user_values is not None and user_row is not None:
        user_values = {name: user_row.get(name, v) for name, v in user_values.items()}
    return OnlineRead(
        values=values,
        user_values=user_values,
        age_s=0.0,
        stale=False,
        batch_age_s=online.batch_age_s,  # the overlay is a window row: the graph is as read
    )
