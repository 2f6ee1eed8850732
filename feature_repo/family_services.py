"""One feature service per detector family, and the campaign view the graph family reads.

A family's service is exactly its inputs (`models.features`), so a model version names
the service it was trained on and the service never changes under it. The campaign
rows (`models.campaign.campaign_features`, computed from the co-activity graph of keys)
are written by the ``feast_online_store`` asset for the latest instant and read online
by ``/score``.
"""

from datetime import timedelta

from data_sources import TIMESTAMP_COLUMN
from entities import api_key
from feast import FeatureService, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64
from feature_views import (
    api_key_1h_fv,
    api_key_1m_fv,
    api_key_5m_fv,
    user_1h_fv,
    user_1m_fv,
    user_5m_fv,
)

from models.campaign import CAMPAIGN_FEATURES
from models.features import COMPACT_FEATURES, ROW_FEATURES
from models.timing import TIMING_FEATURES
from qabuse_dagster.features.store import campaign_folder


def _inputs(views: list[FeatureView], names: tuple[str, ...]) -> list[FeatureView]:
    """The projections of ``views`` onto ``names``, views without any of them left out."""
    out = []
    for view in views:
        present = {field.name for field in view.features}
        wanted = [name for name in names if name in present]
        if wanted:
            out.append(view[wanted])
    return out


_KEY_VIEWS = [api_key_1m_fv, api_key_5m_fv, api_key_1h_fv]
_USER_VIEWS = [user_1m_fv, user_5m_fv, user_1h_fv]


def _family_service(
    name: str, views: list[FeatureView], names: tuple[str, ...], family: str, what: str
) -> FeatureService:
    entity = "user" if views is _USER_VIEWS else "api_key"
    return FeatureService(
        name=name,
        features=_inputs(views, names),
        description=f"Inputs of the {what} family, version 1.",
        tags={"entity": entity, "family": family},
    )


api_key_isolation_forest_v1 = _family_service(
    "api_key_isolation_forest_v1",
    _KEY_VIEWS,
    ROW_FEATURES,
    "isolation_forest",
    "api-key Isolation Forest",
)
api_key_ocsvm_v1 = _family_service(
    "api_key_ocsvm_v1", _KEY_VIEWS, ROW_FEATURES, "ocsvm", "One-Class SVM"
)
api_key_lof_v1 = _family_service(
    "api_key_lof_v1", _KEY_VIEWS, COMPACT_FEATURES, "lof", "Local Outlier Factor"
)
api_key_timing_v1 = _family_service(
    "api_key_timing_v1",
    _KEY_VIEWS,
    TIMING_FEATURES,
    "timing_isolation_forest",
    "timing (rhythm) Isolation Forest",
)
user_isolation_forest_v1 = _family_service(
    "user_isolation_forest_v1",
    _USER_VIEWS,
    ROW_FEATURES,
    "user_isolation_forest",
    "user-level Isolation Forest",
)

api_key_campaign_source = FileSource(
    name="api_key_campaign_source",
    path=str(campaign_folder()),
    file_format=ParquetFormat(),
    timestamp_field=TIMESTAMP_COLUMN,
    description="Campaign (co-activity graph) features of each active api key at the latest "
    "instant the graph was built.",
)
api_key_campaign_fv = FeatureView(
    name="api_key_campaign",
    entities=[api_key],
    ttl=timedelta(hours=2),
    schema=[Field(name=name, dtype=Float64) for name in CAMPAIGN_FEATURES],
    source=api_key_campaign_source,
    online=True,
    description="The coordinated group an api key acts in, if any: its size, synchrony, "
    "networks, users, newness and volume similarity (1-hour and 24-hour graphs, and the "
    "births of the last hour).",
    tags={"entity": "api_key", "kind": "campaign"},
)
api_key_campaign_v2 = FeatureService(
    name="api_key_campaign_v2",
    features=[api_key_campaign_fv],
    description="Inputs of the campaign (graph) family, version 2 (with the births view).",
    tags={"entity": "api_key", "family": "campaign"},
)
