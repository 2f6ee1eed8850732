"""Feast feature views: one per entity and window length (1 minute, 5 minutes, 1 hour).

Every view reads its entity's push source: pushed streaming rows go online directly, and
its batch source (the Parquet window tables) serves materialisation and training sets.
Each row carries all three windows; a view holds one window's columns
(`FEATURES_BY_WINDOW`), so a feature service can pick windows and features per model.
"""

from datetime import timedelta

from data_sources import (
    api_key_sequence_push_source,
    api_key_windows_push_source,
    user_windows_push_source,
)
from entities import api_key, user
from feast import Entity, FeatureView, Field, PushSource
from feast.types import Array, Float64, Int64

from qabuse_dagster.features.definitions import (
    FEATURES_BY_NAME,
    FEATURES_BY_WINDOW,
    SEQUENCE_COLUMNS,
    SEQUENCE_MINUTES,
    WINDOW_LOOKBACK_MINUTES,
)
from qabuse_dagster.features.store import SEQUENCE_KIND

# Historical retrieval returns an entity's latest row up to `ttl` old (rows stop 5 minutes
# after its last record). A row's windows reach back twice their length (each is compared
# with the one before), so its 5-minute figures overlap the present for 10 minutes, and its
# hourly ones for 2 hours (WINDOW_LOOKBACK_MINUTES). The 1-minute view keeps 10 minutes,
# as its rows are the 5-minute view's.
_TTLS = {
    "1m": timedelta(minutes=10),
    "5m": timedelta(minutes=10),
    "1h": timedelta(minutes=WINDOW_LOOKBACK_MINUTES),
}
_SPANS = {
    "1m": "the last minute",
    "5m": "the last five minutes",
    "1h": "the last hour, how unusual its last minute was, and its last 24 hours' activity",
}


def _fields(window: str) -> list[Field]:
    specs = [FEATURES_BY_NAME[name] for name in FEATURES_BY_WINDOW[window]]
    return [
        Field(
            name=spec.name,
            dtype=Int64 if spec.integer else Float64,
            description=f"{spec.description} Unit: {spec.unit}.",
        )
        for spec in specs
    ]


def _window_view(entity: Entity, source: PushSource, window: str, who: str) -> FeatureView:
    return FeatureView(
        name=f"{entity.name}_{window}",
        entities=[entity],
        ttl=_TTLS[window],
        schema=_fields(window),
        source=source,
        online=True,
        description=f"What {who} did in {_SPANS[window]}.",
        tags={"entity": entity.name, "window": window},
    )


api_key_1m_fv = _window_view(api_key, api_key_windows_push_source, "1m", "an api key")
api_key_5m_fv = _window_view(api_key, api_key_windows_push_source, "5m", "an api key")
api_key_1h_fv = _window_view(api_key, api_key_windows_push_source, "1h", "an api key")

user_1m_fv = _window_view(user, user_windows_push_source, "1m", "a user")
user_5m_fv = _window_view(user, user_windows_push_source, "5m", "a user")
user_1h_fv = _window_view(user, user_windows_push_source, "1h", "a user")

_CHANNELS = {
    "submissions": "submissions",
    "failures": "failed or rejected outcomes",
    "auth_failures": "records with error code auth_failed",
    "shots_sum": "shots of the submissions",
    "distinct_code_hashes": "distinct code hashes submitted",
}

api_key_sequence_fv = FeatureView(
    name="api_key_sequence",
    entities=[api_key],
    # Offline rows are each key's latest of an hour; streaming pushes keep online fresh.
    ttl=timedelta(minutes=WINDOW_LOOKBACK_MINUTES),
    schema=[
        Field(
            name=column,
            dtype=Array(Int64),
            description=f"Per minute, {_CHANNELS[channel]}: the {SEQUENCE_MINUTES} minutes "
            "before the row, oldest first, 0 for silent minutes. Unit: per minute.",
        )
        for channel, column in SEQUENCE_COLUMNS.items()
    ],
    source=api_key_sequence_push_source,
    online=True,
    description="What an api key did in each of its last 60 minutes (sequence models).",
    tags={"entity": "api_key", "kind": SEQUENCE_KIND},
)
