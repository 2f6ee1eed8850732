"""The collector against its own OpenAPI spec: generated bodies, documented answers.

Beside Schemathesis (``test_collector_schemathesis.py``), which checks that every answer
is documented, hypothesis-jsonschema generates request bodies from the schema the
collector publishes at ``/openapi.json`` to check what a generic fuzzer cannot: every
body the spec allows is accepted record by record, and any JSON at all gets a documented
answer (200 or 400), never a server error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from qabuse_dagster.ingest.collector import ENDPOINT, create_app
from qabuse_dagster.ingest.time_range import AcceptedRange
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import _parse_rfc3339, format_rfc3339_utc

pytestmark = pytest.mark.fuzz  # a hostile-input suite: `make fuzz` runs it

TOKEN = "openapi-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTRACT = Path(__file__).resolve().parents[2] / (
    "qabuse_dagster/telemetry/schemas/telemetry-record.v1.schema.json"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    paths = Paths(tmp_path_factory.mktemp("collector-openapi") / "home")
    app = create_app(paths, {TOKEN: "fuzz"}, rate_per_s=1e6, burst=1_000_000)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def body_schema(client: TestClient) -> dict[str, Any]:
    spec = client.get("/openapi.json").json()
    content = spec["paths"][ENDPOINT]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-ndjson"} <= set(content)
    return content["application/json"]["schema"]


def test_the_published_body_schema_is_an_array_of_contract_records(
    body_schema: dict[str, Any],
) -> None:
    contract = json.loads(CONTRACT.read_text(encoding="utf-8"))
    for key in ("$schema", "$id"):
        contract.pop(key)

    assert body_schema == {"type": "array", "items": contract}


_INT64_MAX = 2**63 - 1
_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {}


def _record_strategy(contract: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Records the published schema allows, property by property.

    hypothesis-jsonschema 0.23 cannot draw objects under this hypothesis release, so
    objects (the record, ``gate_counts``, ``tags``) are assembled here from their parts'
    strategies. Integers without a maximum are capped at int64, the storage limit the
    collector documents. A Python regex ``$`` also matches before a final newline, which
    JSON Schema's (ECMA) ``$`` does not: drawn strings ending in one are left out.
    """

    def prop(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        types = schema["type"] if isinstance(schema.get("type"), list) else [schema.get("type")]
        if "object" in types:
            values = prop(schema.get("additionalProperties", {}))
            objects = st.dictionaries(
                st.text(max_size=12), values, max_size=schema.get("maxProperties", 4)
            )
            return objects | st.none() if "null" in types else objects
        if "integer" in types and "maximum" not in schema:
            schema = {**schema, "maximum": _INT64_MAX}
        strategy = from_schema(schema)
        if "pattern" in schema:
            strategy = strategy.filter(lambda v: not (isinstance(v, str) and v.endswith("\n")))
        return strategy

    properties = contract["properties"]
    required = set(contract["required"])
    return st.fixed_dictionaries(
        {name: prop(properties[name]) for name in properties if name in required},
        optional={name: prop(properties[name]) for name in properties if name not in required},
    )


def _answer_is_documented(answer: Any, sent: int) -> None:
    assert set(answer) == {
        "accepted",
        "duplicates",
        "rejected",
        "rejected_total",
        "rejections_truncated",
        "reasons",
        "not_quarantined",
    }
    assert answer["accepted"] + answer["duplicates"] + answer["rejected_total"] == sent
    assert answer["rejections_truncated"] == (answer["rejected_total"] > len(answer["rejected"]))
    assert sum(reason["count"] for reason in answer["reasons"]) == answer["rejected_total"]
    for rejected in answer["rejected"]:
        assert 0 <= rejected["index"] < sent and rejected["errors"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_every_body_the_spec_allows_is_accepted_within_the_time_range(
    client: TestClient, body_schema: dict[str, Any], data: st.DataObject
) -> None:
    if "records" not in _STRATEGIES:  # built once: from_schema canonicalises on every call
        _STRATEGIES["records"] = st.lists(_record_strategy(body_schema["items"]), max_size=4)
    records = data.draw(_STRATEGIES["records"])

    response = client.post(ENDPOINT, json=records, headers=AUTH)

    assert response.status_code == 200, response.text
    answer = response.json()
    _answer_is_documented(answer, len(records))
    # The contract admits years 1 to 9999; the collector refuses what no partition holds
    # (qabuse_dagster.ingest.time_range), and nothing else.
    bounds = AcceptedRange.from_settings().at()
    for rejected in answer["rejected"]:
        stamp = format_rfc3339_utc(_parse_rfc3339(records[rejected["index"]]["timestamp"]))
        ((field, why),) = rejected["errors"]
        assert field == "timestamp" and why.startswith(stamp), rejected
        assert bounds.reason(stamp) is not None, rejected


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=_json)
def test_any_json_body_gets_a_documented_answer_never_a_server_error(
    client: TestClient, body: Any
) -> None:
    response = client.post(ENDPOINT, content=json.dumps(body), headers=AUTH)

    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        assert isinstance(body, list)
        _answer_is_documented(response.json(), len(body))
    else:
        assert response.json()["detail"]
