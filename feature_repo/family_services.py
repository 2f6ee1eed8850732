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

from models.features import COMPACT_FEATURES, ROW_FEATURES
from models.timing import TIMING_FEATURES
from qabuse_dagster.features.store import campaign_folder

CAMPAIGN_FEATURES = (
    "group_keys_1h",
    "sync_lift_1h",
    "sync_share_1h",
    "group_networks_1h",
    "group_users_1h",
    "group_new_share_1h",
    "volume_similarity_1h",
    "group_keys_24h",
    "sync_lift_24h",
    "sync_share_24h",
    "group_networks_24h",
    "group_users_24h",
    "group_new_share_24h",
    "volume_similarity_24h",
)


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

api_key_isolation_forest_v1 = FeatureService(
    name="api_key_isolation_forest_v1",
    features=_inputs(_KEY_VIEWS, ROW_FEATURES),
    description="Inputs of the api-key Isolation Forest family, version 1.",
    tags={"entity": "api_key", "family": "isolation_forest"},
)
api_key_ocsvm_v1 = FeatureService(
    name="api_key_ocsvm_v1",
    features=_inputs(_KEY_VIEWS, ROW_FEATURES),
    description="Inputs of the One-Class SVM family, version 1.",
    tags={"entity": "api_key", "family": "ocsvm"},
)
api_key_lof_v1 = FeatureService(
    name="api_key_lof_v1",
    features=_inputs(_KEY_VIEWS, COMPACT_FEATURES),
    description="Inputs of the Local Outlier Factor family, version 1.",
    tags={"entity": "api_key", "family": "lof"},
)
api_key_timing_v1 = FeatureService(
    name="api_key_timing_v1",
    features=_inputs(_KEY_VIEWS, TIMING_FEATURES),
    description="Inputs of the timing (rhythm) Isolation Forest family, version 1.",
    tags={"entity": "api_key", "family": "timing_isolation_forest"},
)
user_isolation_forest_v1 = FeatureService(
    name="user_isolation_forest_v1",
    features=_inputs(_USER_VIEWS, ROW_FEATURES),
    description="Inputs of the user-level Isolation Forest family, version 1.",
    tags={"entity": "user", "family": "user_isolation_forest"},
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
    "networks, users, newness and volume similarity (1-hour and 24-hour graphs).",
    tags={"entity": "api_key", "kind": "campaign"},
)
api_key_campaign_v1 = FeatureService(
    name="api_key_campaign_v1",
    features=[api_key_campaign_fv],
    description="Inputs of the campaign (graph) family, version 1.",
    tags={"entity": "api_key", "family": "campaign"},
)
