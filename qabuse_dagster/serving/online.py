"""The champion's inputs read online: one Feast read per entity for every member family.

`OnlineInputs.resolve` turns the members' feature services into the feature views and
features to read per entity (api key, user), once per loaded champion; a request then
costs one online-store read for its keys (and for their users, when the caller names
them), and each family's input is cut from that read: its rows, its sequence channels
(array features) or its campaign features.

Feast stays the writer and the registry the schema; the read skips
``FeatureStore.get_online_features``'s per-call resolution of the references against the
registry and its response assembly. On Feast's SQLite store (the embedded default) it is
one prepared statement over every view's table, for every key of a request, decoding only
the features asked for (`SqliteRows`); on Redis, one pipeline of Feast's own ``HMGET``
commands for every view (`RedisRows`); on any other store, that store's own
``online_read`` (the interface every Feast online store implements), view by view
(`StoreRows`). All convert the values as Feast's ``feast_value_type_to_python_type``
does, and tests hold them equal to ``get_online_features``.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models import BaseDetector
from models.base import score_floor
from models.registry import DetectorFamily, get_family
from qabuse_dagster.features.definitions import SEQUENCE_COLUMNS, SEQUENCE_MINUTES

__all__ = ["OnlineInputs", "OnlineRead", "RedisRows", "SqliteRows", "StoreRows"]

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
#: One entity's read: each feature's value (None when absent), and each view that held
#: one of them with its event time.
EntityRead = tuple[dict[str, Any], list[tuple[Any, datetime]]]

#: Value kinds whose Python value is the field itself, or the list of its items, in
#: ``feast_value_type_to_python_type``; it converts any other kind.
_SCALAR_KINDS = frozenset(
    {"double_val", "float_val", "int64_val", "int32_val", "bool_val", "string_val", "bytes_val"}
)
_LIST_KINDS = frozenset(
    {"double_list_val", "float_list_val", "int64_list_val", "int32_list_val", "bool_list_val"}
)


def python_value(proto: Any) -> Any:
    """A Feast ``Value`` proto as ``feast_value_type_to_python_type`` gives it, faster for
    the kinds qabuse's views hold (numbers and lists of numbers)."""
    kind = proto.WhichOneof("val")
    if kind in _SCALAR_KINDS:
        return getattr(proto, kind)
    if kind in _LIST_KINDS:
        return list(getattr(proto, kind).val)
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(proto)


class EntityRows(Protocol):
    """Reads one entity's features, view by view, for several entity values at once."""

    def read(self, store: Any, values: Sequence[str]) -> list[EntityRead]: ...


@dataclass
class StoreRows:
    """Reads through the configured online store's own ``online_read`` (any Feast store)."""

    views: ViewReads
    join_key: str
    online_store: Any

    def read(self, store: Any, values: Sequence[str]) -> list[EntityRead]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        entities = [
            EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=value)])
            for value in values
        ]
        reads: list[EntityRead] = [({}, []) for _ in values]
        for view, names in self.views:
            # A copy: the Redis store appends its timestamp field to the list it is given.
            rows = self.online_store.online_read(
                config=store.config,
                table=view,
                entity_keys=entities,
                requested_features=list(names),
            )
            for (found_values, stamps), (stamp, found) in zip(reads, rows, strict=True):
                self._take(view, names, stamp, found, found_values, stamps)
        return reads

    @staticmethod
    def _take(
        view: Any,
        names: list[str],
        stamp: datetime | None,
        found: dict[str, Any] | None,
        values: dict[str, Any],
        stamps: list[tuple[Any, datetime]],
    ) -> None:
        """One view's reply for one entity, as ``values`` and, when it held any, a stamp."""
        found = found or {}
        for name in names:
            proto = found.get(name)
            values[name] = python_value(proto) if proto else None
        if stamp is not None and any(values[name] is not None for name in names):
            at = stamp.astimezone(UTC) if stamp.tzinfo else stamp.replace(tzinfo=UTC)
            stamps.append((view, at))


class SqliteRows:
    """Reads Feast's SQLite online store directly: one statement for every view and key.

    Feast's ``SqliteOnlineStore.online_read`` runs one query per view and decodes every
    feature of the view; this reads the tables Feast writes (the names and entity-key
    encoding are Feast's own helpers) on a read-only connection, in one ``UNION ALL``
    statement that SQLite keeps prepared, and decodes only the features asked for. The
    event time of a view is Feast's: its last row's, read as Feast's converter reads it.

    Args:
        config: The store's ``RepoConfig``.
        views: The views and features to read.
        join_key: The entity's join key (``api_key_id``, ``user``).
    """

    #: Prepared statements kept: one per number of keys a request reads.
    CACHED_STATEMENTS = 512

    def __init__(self, config: Any, views: ViewReads, join_key: str) -> None:
        from feast.infra.online_stores.helpers import compute_table_id
        from feast.infra.online_stores.sqlite import SqliteOnlineStore

        self.views = views
        self.join_key = join_key
        self._serialisation = config.entity_key_serialization_version
        versioned = config.registry.enable_online_feature_view_versioning
        self._tables = [compute_table_id(config.project, view, versioned) for view, _ in views]
        self._wanted = [frozenset(names) for _, names in views]
        self._path = Path(SqliteOnlineStore._get_db_path(config)).resolve()
        self._statements: dict[int, str] = {}
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @staticmethod
    def supports(config: Any) -> bool:
        """Whether ``config`` names Feast's SQLite online store (without vector search)."""
        online = config.online_store
        kind = str(getattr(online, "type", ""))
        sqlite = kind == "sqlite" or kind.endswith("SqliteOnlineStore")
        return sqlite and not getattr(online, "vector_enabled", False)

    def _statement(self, count: int) -> str:
        statement = self._statements.get(count)
        if statement is None:
            marks = ",".join("?" * count)
            statement = " UNION ALL ".join(
                f"SELECT {i}, entity_key, feature_name, value, event_ts FROM "
                + '"{}"'.format(table.replace('"', '""'))
                + f" WHERE entity_key IN ({marks})"
                for i, table in enumerate(self._tables)
            )
            self._statements[count] = statement
        return statement

    def _rows(self, keys: list[bytes]) -> list[tuple[Any, ...]]:
        if not keys or not self._tables:
            return []
        with self._lock:
            if self._connection is None:
                if not self._path.exists():  # nothing materialised yet: nothing online
                    return []
                self._connection = sqlite3.connect(
                    f"{self._path.as_uri()}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                    cached_statements=self.CACHED_STATEMENTS,
                )
            return self._connection.execute(
                self._statement(len(keys)), keys * len(self._tables)
            ).fetchall()

    def read(self, store: Any, values: Sequence[str]) -> list[EntityRead]:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = [
            serialize_entity_key(
                EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=value)]),
                entity_key_serialization_version=self._serialisation,
            )
            for value in values
        ]
        unique = list(dict.fromkeys(keys))
        found: dict[bytes, list[dict[str, Any]]] = {key: [{} for _ in self.views] for key in unique}
        stamps: dict[tuple[bytes, int], Any] = {}
        for view, key, name, blob, event_ts in self._rows(unique):
            # Each row overwrites the view's time, as in Feast: its last row's is kept (a
            # view's features of a key are written together, with one time).
            stamps[key, view] = event_ts
            if name in self._wanted[view]:
                found[key][view][name] = python_value(Value.FromString(blob))
        reads: list[EntityRead] = []
        for key in keys:
            values_read: dict[str, Any] = {}
            times: list[tuple[Any, datetime]] = []
            for i, (view, names) in enumerate(self.views):
                row = found[key][i]
                for name in names:
                    values_read[name] = row.get(name)
                event_ts = stamps.get((key, i))
                if event_ts is not None and any(v is not None for v in row.values()):
                    # Feast's SQLite converter: epoch seconds as a naive local time, then
                    # marked UTC by its online_read.
                    times.append((view, datetime.fromtimestamp(int(event_ts)).replace(tzinfo=UTC)))
            reads.append((values_read, times))
        return reads


class RedisRows(StoreRows):
    """Reads Feast's Redis online store with one pipeline for every view and key.

    Feast's ``RedisOnlineStore.online_read`` sends one pipeline of ``HMGET`` per view;
    this sends the same commands (the store's own key and field encoding) for every view
    in one pipeline, one round trip a request, and decodes the replies with the store's
    own converter. Those are the store's private helpers (Feast 0.67):
    ``tests/features/test_redis_store.py`` holds the read equal to Feast's on a real Redis.
    """

    def __init__(self, config: Any, views: ViewReads, join_key: str, online_store: Any) -> None:
        from feast.infra.online_stores.redis import _versioned_fv_name

        super().__init__(views, join_key, online_store)
        self._fields = []
        for view, names in views:
            name = _versioned_fv_name(view, config)
            requested, fields = online_store._generate_hset_keys_for_features(
                view, list(names), fv_name_override=name
            )
            self._fields.append((name, requested, fields))

    @staticmethod
    def supports(config: Any) -> bool:
        """Whether ``config`` names Feast's Redis online store."""
        kind = str(getattr(config.online_store, "type", ""))
        return kind == "redis" or kind.endswith("RedisOnlineStore")

    def read(self, store: Any, values: Sequence[str]) -> list[EntityRead]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        if not values or not self.views:
            return [({}, []) for _ in values]
        entities = [
            EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=value)])
            for value in values
        ]
        online_store = self.online_store
        keys = online_store._generate_redis_keys_for_entities(store.config, entities)
        commands = [(key, fields) for _, _, fields in self._fields for key in keys]
        replies = online_store._read_hash_fields(store.config, commands)
        reads: list[EntityRead] = [({}, []) for _ in values]
        for i, ((view, names), (name, requested, _)) in enumerate(
            zip(self.views, self._fields, strict=True)
        ):
            for (found_values, stamps), reply in zip(
                reads, replies[i * len(keys) : (i + 1) * len(keys)], strict=True
            ):
                stamp, found = online_store._get_features_for_entity(reply, name, requested)
                self._take(view, names, stamp, found, found_values, stamps)
        return reads


def _entity_rows(store: Any, views: ViewReads, join_key: str, online_store: Any) -> EntityRows:
    if SqliteRows.supports(store.config):
        return SqliteRows(store.config, views, join_key)
    if RedisRows.supports(store.config):
        return RedisRows(store.config, views, join_key, online_store)
    return StoreRows(views, join_key, online_store)


@dataclass
class OnlineInputs:
    """Feature references per entity for a champion's member families.

    ``key_refs`` and ``user_refs`` are ``view:feature`` references (what
    ``get_online_features`` takes); ``key_views`` and ``user_views`` the same, grouped
    by feature view, for the direct read; ``key_rows`` and ``user_rows`` read them.
    """

    families: dict[str, DetectorFamily]
    key_refs: list[str]
    user_refs: list[str]
    services: list[str] = field(default_factory=list)
    key_views: ViewReads = field(default_factory=list)
    user_views: ViewReads = field(default_factory=list)
    key_rows: EntityRows | None = None
    user_rows: EntityRows | None = None
    #: The feature services read, as a /score answer names them (comma-separated).
    feature_service: str = ""

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
        key_views, user_views = _views(store, key_list), _views(store, user_list)
        online_store = get_online_store_from_config(store.config.online_store)
        services = sorted({f.feature_service for f in members.values()})
        return cls(
            families=members,
            key_refs=key_list,
            user_refs=user_list,
            services=services,
            feature_service=",".join(services),
            key_views=key_views,
            user_views=user_views,
            key_rows=_entity_rows(store, key_views, "api_key_id", online_store),
            user_rows=_entity_rows(store, user_views, "user", online_store),
        )

    def read(
        self, store: Any, api_key_id: str, user: str | None, *, max_age: timedelta
    ) -> OnlineRead:
        (read,) = self.read_many(store, [(api_key_id, user)], max_age=max_age)
        return read

    def read_many(
        self, store: Any, keys: Sequence[tuple[str, str | None]], *, max_age: timedelta
    ) -> list[OnlineRead]:
        """`read` of each (api key, user or None) pair, in one online read per entity."""
        assert self.key_rows is not None and self.user_rows is not None  # set by resolve
        key_reads = self.key_rows.read(store, [key for key, _ in keys])
        users = list(dict.fromkeys(user for _, user in keys if user is not None))
        user_reads: dict[str, dict[str, Any]] = {}
        if users and self.user_views:
            user_reads = {
                user: values
                for user, (values, _) in zip(users, self.user_rows.read(store, users), strict=True)
            }
        now = datetime.now(UTC)
        limit_s = max_age.total_seconds()
        reads = []
        for (values, stamps), (_, user) in zip(key_reads, keys, strict=True):
            streamed = [stamp for view, stamp in stamps if view.stream_source is not None]
            batch = [stamp for view, stamp in stamps if view.stream_source is None]
            judged = streamed or batch
            age_s = (now - min(judged)).total_seconds() if judged else None
            reads.append(
                OnlineRead(
                    values=values,
                    user_values=user_reads.get(user) if user is not None else None,
                    age_s=age_s,
                    stale=age_s is None or age_s > limit_s,
                    batch_age_s=(now - min(batch)).total_seconds() if batch else None,
                )
            )
        return reads

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
