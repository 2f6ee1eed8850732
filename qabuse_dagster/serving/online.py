"""The champion's inputs read online: one Feast read per entity for every member family.

`OnlineInputs.resolve` turns the members' feature services into the feature views and
features to read per entity (api key, user), once per loaded champion; a request then
costs one online-store read per view for the key (and for the user, when the caller
names it), and each family's input is cut from that read: its rows, its sequence
channels (array features) or its campaign features.

The read goes to the configured online store's own ``online_read`` (the interface every
Feast online store implements: SQLite, Redis, ...), view by view, and converts the
values with Feast's ``feast_value_type_to_python_type``: the values and timestamps
``FeatureStore.get_online_features`` returns, without its per-call resolution of the
references against the registry and its response assembly (about half of a /score's
read). A test holds the two equal.
"""

from __future__ import annotations

import math
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
    #: Seconds since the oldest event time of the views the stream worker feeds (or of
    #: every view, when none of them is): what ``stale`` is judged on.
    age_s: float | None
    stale: bool
    #: Seconds since the oldest event time of the views only the batch job writes (the
    #: campaign graph): as fresh as the last materialisation, whatever the stream does.
    batch_age_s: float | None = None

    @property
    def known(self) -> bool:
        return any(v is not None for v in self.values.values())

    @property
    def scalars(self) -> dict[str, float]:
        return {
            name: float(v)
            for name, v in self.values.items()
            if v is not None and not isinstance(v, list) and math.isfinite(float(v))
        }


def _views(store: Any, refs: list[str]) -> ViewReads:
    """``view:feature`` references grouped by feature view, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for ref in refs:
        view, feature = ref.split(":", 1)
        grouped.setdefault(view, []).append(feature)
    return [(store.get_feature_view(view), names) for view, names in grouped.items()]


def _online_names(family: DetectorFamily) -> list[str]:
    if family.input_kind == "sequences":
        return [SEQUENCE_COLUMNS[channel] for channel in family.feature_names]
    return list(family.feature_names)


#: Per feature view: the view and the features read from it.
ViewReads = list[tuple[Any, list[str]]]


@dataclass
class OnlineInputs:
    """Feature references per entity for a champion's member families.

    ``key_refs`` and ``user_refs`` are ``view:feature`` references (what
    ``get_online_features`` takes); ``key_views`` and ``user_views`` the same, grouped
    by feature view, for the direct read.
    """

    families: dict[str, DetectorFamily]
    key_refs: list[str]
    user_refs: list[str]
    services: list[str] = field(default_factory=list)
    key_views: ViewReads = field(default_factory=list)
    user_views: ViewReads = field(default_factory=list)
    online_store: Any = None

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
        from feast.infra.online_stores.helpers import get_online_store_from_config

        key_list, user_list = list(key_refs.values()), list(user_refs.values())
        return cls(
            families=members,
            key_refs=key_list,
            user_refs=user_list,
            services=sorted({f.feature_service for f in members.values()}),
            key_views=_views(store, key_list),
            user_views=_views(store, user_list),
            online_store=get_online_store_from_config(store.config.online_store),
        )

    def read(
        self, store: Any, api_key_id: str, user: str | None, *, max_age: timedelta
    ) -> OnlineRead:
        values, stamps = self._read(store, self.key_views, "api_key_id", api_key_id)
        now = datetime.now(UTC)
        streamed = [stamp for view, stamp in stamps if view.stream_source is not None]
        batch = [stamp for view, stamp in stamps if view.stream_source is None]
        judged = streamed or batch
        age_s = (now - min(judged)).total_seconds() if judged else None
        batch_age_s = (now - min(batch)).total_seconds() if batch else None
        user_values = None
        if user is not None and self.user_views:
            user_values, _ = self._read(store, self.user_views, "user", user)
        stale = age_s is None or age_s > max_age.total_seconds()
        return OnlineRead(
            values=values,
            user_values=user_values,
            age_s=age_s,
            stale=stale,
            batch_age_s=batch_age_s,
        )

    def _read(
        self, store: Any, views: ViewReads, join_key: str, value: str
    ) -> tuple[dict[str, Any], list[tuple[Any, datetime]]]:
        """Each feature's value (None when absent), and each view read with its event time."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        entity = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
        values: dict[str, Any] = {}
        stamps: list[tuple[Any, datetime]] = []
        for view, names in views:
            # A copy: the Redis store appends its timestamp field to the list it is given.
            ((stamp, found),) = self.online_store.online_read(
                config=store.config,
                table=view,
                entity_keys=[entity],
                requested_features=list(names),
            )
            found = found or {}
            for name in names:
                proto = found.get(name)
                values[name] = feast_value_type_to_python_type(proto) if proto else None
            if stamp is not None and any(values[name] is not None for name in names):
                at = stamp.astimezone(UTC) if stamp.tzinfo else stamp.replace(tzinfo=UTC)
                stamps.append((view, at))
        return values, stamps

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
            [[float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in row]]
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
