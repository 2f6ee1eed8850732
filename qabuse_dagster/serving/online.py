"""The champion's inputs read online: one Feast read per entity for every member family.

`OnlineInputs.resolve` turns the members' feature services into one list of feature
references per entity (api key, user), once per loaded champion; a request then costs
one online read for the key (and one for the user, when the caller names it), and each
family's input is cut from that read: its rows, its sequence channels (array features)
or its campaign features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from models import BaseDetector
from models.base import score_floor
from models.registry import DetectorFamily, get_family
from qabuse_dagster.features.definitions import SEQUENCE_COLUMNS, SEQUENCE_MINUTES

__all__ = ["OnlineInputs", "OnlineRead"]

#: Features named in a /score answer's explanation.
TOP_FEATURES = 3


@dataclass(frozen=True)
class OnlineRead:
    """What the online store holds for one key (and its user) at the time of the request."""

    values: dict[str, Any]
    user_values: dict[str, Any] | None
    age_s: float | None
    stale: bool

    @property
    def known(self) -> bool:
        return any(v is not None for v in self.values.values())

    @property
    def scalars(self) -> dict[str, float]:
        return {
            name: float(v)
            for name, v in self.values.items()
            if v is not None and not isinstance(v, list) and np.isfinite(float(v))
        }


def _online_names(family: DetectorFamily) -> list[str]:
    if family.input_kind == "sequences":
        return [SEQUENCE_COLUMNS[channel] for channel in family.feature_names]
    return list(family.feature_names)


@dataclass
class OnlineInputs:
    """Feature references per entity for a champion's member families."""

    families: dict[str, DetectorFamily]
    key_refs: list[str]
    user_refs: list[str]
    services: list[str] = field(default_factory=list)

    @classmethod
    def resolve(cls, store: Any, champion: Any) -> OnlineInputs:
        members = {name: get_family(name) for name in champion.members}
        key_refs: dict[str, str] = {}
        user_refs: dict[str, str] = {}
        for family in members.values():
            service = store.get_feature_service(family.feature_service)
            wanted = set(_online_names(family))
            target = user_refs if family.entity == "user" else key_refs
            for projection in service.feature_view_projections:
                for feature in projection.features:
                    if feature.name in wanted:
                        target[feature.name] = f"{projection.name_to_use()}:{feature.name}"
            missing = wanted - set(target)
            if missing:
                raise ValueError(
                    f"feature service {family.feature_service} lacks {sorted(missing)}, "
                    f"inputs of the {family.name} family"
                )
        return cls(
            families=members,
            key_refs=list(key_refs.values()),
            user_refs=list(user_refs.values()),
            services=sorted({f.feature_service for f in members.values()}),
        )

    def read(
        self, store: Any, api_key_id: str, user: str | None, *, max_age: timedelta
    ) -> OnlineRead:
        from feast.online_response import TIMESTAMP_POSTFIX

        response = store.get_online_features(
            features=self.key_refs, entity_rows=[{"api_key_id": api_key_id}]
        ).to_dict(include_event_timestamps=True)
        names = [ref.split(":", 1)[1] for ref in self.key_refs]
        values = {name: response[name][0] for name in names}
        seconds = [
            response[f"{name}{TIMESTAMP_POSTFIX}"][0]
            for name in names
            if values[name] is not None and response[f"{name}{TIMESTAMP_POSTFIX}"][0] > 0
        ]
        age_s = None
        if seconds:
            oldest = datetime.fromtimestamp(min(seconds), UTC)
            age_s = (datetime.now(UTC) - oldest).total_seconds()
        user_values = None
        if user is not None and self.user_refs:
            user_response = store.get_online_features(
                features=self.user_refs, entity_rows=[{"user": user}]
            ).to_dict()
            user_values = {
                ref.split(":", 1)[1]: user_response[ref.split(":", 1)[1]][0]
                for ref in self.user_refs
            }
        stale = age_s is None or age_s > max_age.total_seconds()
        return OnlineRead(values=values, user_values=user_values, age_s=age_s, stale=stale)

    def warm_up(self, members: dict[str, BaseDetector]) -> None:
        """Score and explain an all-zero input with every member, once.

        A family builds its scoring caches on first use (a compiled forest, shap's tree
        explainer: up to a second); done here, at load, no request pays for it.
        """
        empty = OnlineRead(values={}, user_values={}, age_s=None, stale=True)
        for name, detector in members.items():
            self.score(name, detector, empty)
            self.explain(name, detector, empty)

    def _matrix(self, family: DetectorFamily, online: OnlineRead) -> np.ndarray | None:
        if family.input_kind == "sequences":
            channels = []
            for name in _online_names(family):
                array = online.values.get(name)
                channels.append(array if array is not None else [0] * SEQUENCE_MINUTES)
            return np.asarray(channels, dtype=np.float64).T[None, :, :]
        source = online.user_values if family.entity == "user" else online.values
        if source is None:
            return None
        row = [source.get(name) for name in family.feature_names]
        return np.asarray(
            [[float(v) if v is not None and np.isfinite(float(v)) else 0.0 for v in row]]
        )

    def score(self, name: str, detector: BaseDetector, online: OnlineRead) -> float:
        """The family's score; a user family without a user scores its training minimum."""
        X = self._matrix(self.families[name], online)
        if X is None:
            return score_floor(detector)
        return float(detector.decision_function(X)[0])

    def explain(
        self, name: str, detector: BaseDetector, online: OnlineRead
    ) -> list[dict[str, Any]]:
        """The family's ``TOP_FEATURES`` largest contributions, with the features' values."""
        family = self.families[name]
        X = self._matrix(family, online)
        if X is None:
            return []
        contributions = detector.explain(X)[0]
        order = np.argsort(-contributions)[:TOP_FEATURES]
        source = (online.user_values if family.entity == "user" else online.values) or {}
        out = []
        for i in order:
            feature = family.feature_names[int(i)]
            value = source.get(feature)
            out.append(
                {
                    "feature": feature,
                    "contribution": float(contributions[int(i)]),
                    "value": float(value) if isinstance(value, int | float) else None,
                }
            )
        return out
