"""Feast feature views: one per window length, both over the api-key window source.

Both read the push source: pushed streaming rows go online directly, and its batch
source (the Parquet window tables) serves materialisation and training sets.
"""

from datetime import timedelta

from data_sources import api_key_windows_push_source
from entities import api_key
from feast import FeatureView, Field
from feast.types import Float64, Int64

from qabuse_dagster.features.windows import FEATURES, FEATURES_1M, FEATURES_5M

_DTYPES = {
    "submissions_1m": Int64,
    "distinct_code_hashes_1m": Int64,
    "distinct_code_hashes_5m": Int64,
}
_DESCRIPTIONS = {f.name: f"{f.description} Unit: {f.unit}." for f in FEATURES}


def _fields(names: tuple[str, ...]) -> list[Field]:
    return [
        Field(name=n, dtype=_DTYPES.get(n, Float64), description=_DESCRIPTIONS[n]) for n in names
    ]


api_key_1m_fv = FeatureView(
    name="api_key_1m",
    entities=[api_key],
    # Historical retrieval ignores rows older than this; a 1-minute window is stale fast.
    ttl=timedelta(minutes=10),
    schema=_fields(FEATURES_1M),
    source=api_key_windows_push_source,
    online=True,
    description="What an api key did in the last minute.",
    tags={"window": "1m"},
)

api_key_5m_fv = FeatureView(
    name="api_key_5m",
    entities=[api_key],
    ttl=timedelta(minutes=10),
    schema=_fields(FEATURES_5M),
    source=api_key_windows_push_source,
    online=True,
    description="What an api key did in the last five minutes, and its z-score.",
    tags={"window": "5m"},
)
