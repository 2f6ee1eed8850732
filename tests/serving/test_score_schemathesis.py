"""Schemathesis against the OpenAPI spec that the running scoring endpoint publishes.

A real ``bentoml serve`` over the session's trained @champion (the home ``pipeline_run``
builds, as in ``test_service.py``) publishes its spec at ``/docs.json``. Schemathesis
generates valid and invalid ``POST /score`` bodies from it; every answer must be
documented: never a 5xx, a declared status code and content type, and a success body
that matches the declared schema. BentoML's own routes (health, readiness, metrics) take
no input and are left out. The hostile requests at the end are the ones
``test_service.py`` does not already send; after each, the endpoint must still score.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import (
    positive_data_acceptance,
    response_schema_conformance,
)

from qabuse_dagster.serving.client import ScoringClient
from qabuse_dagster.serving.server import scoring_server

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]

# BentoML tags every @bentoml.api route with this; its own routes are "Infrastructure".
SERVICE_APIS_TAG = "Service APIs"


@pytest.fixture(scope="module")
def endpoint(pipeline_run) -> Iterator[ScoringClient]:
    with scoring_server() as client:
        yield client


@pytest.fixture(scope="module")
def published_schema(endpoint: ScoringClient) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{endpoint.url}/docs.json")


@pytest.fixture(autouse=True)
def _pytest9_node_id(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's from_fixture reads and rewrites Node._nodeid, which pytest 9.2 dropped.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("published_schema").include(tag=SERVICE_APIS_TAG)


def success_matches_declared_schema(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """``response_schema_conformance`` for the answers below 400: the body schema is ours.

    The error bodies are BentoML's and do not match what BentoML itself declares
    (``{"error": str, "detail": str}``): a validation error's ``detail`` is a list, and a
    4xx raised by the service is wrapped in a one-element list (bentoml/BentoML#4232).
    ``error_says_why`` checks what a client can rely on instead.
    """
    if response.status_code >= 400:
        return None
    return response_schema_conformance(ctx, response, case)


def valid_body_is_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """``positive_data_acceptance`` for the requests that carry a body.

    BentoML never marks a request body ``required``, so by the letter of the spec a POST
    with no body is valid; ``/score`` can only answer it 400 (no ``api_key_id``).
    """
    if isinstance(case.body, NotSet):
        return None
    return positive_data_acceptance(ctx, response, case)


def error_says_why(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Every refusal of a declared operation is a JSON object with a non-empty ``error``.

    The coverage phase also sends other methods (PUT, TRACE...); the router's plain-text
    405 to those is schemathesis's own method checks' business.
    """
    if response.status_code < 400 or case.method.upper() != case.operation.method.upper():
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.text[:300]}") from None
    # BentoML wraps a 4xx BentoMLException's body in a one-element list (bentoml/BentoML#4232).
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    assert isinstance(body, dict), f"error body is not an object: {response.text[:300]}"
    assert isinstance(body.get("error"), str), f"error body has no message: {response.text[:300]}"
    assert body["error"], f"error body has an empty message: {response.text[:300]}"
    return None


@schema.parametrize()
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_documented(case: schemathesis.Case, endpoint: ScoringClient) -> None:
    case.call_and_validate(
        base_url=endpoint.url,
        timeout=30,
        excluded_checks=[response_schema_conformance, positive_data_acceptance],
        additional_checks=[
            success_matches_declared_schema,
            valid_body_is_accepted,
            error_says_why,
        ],
    )


def test_every_known_key_is_answered_as_declared(
    pipeline_run, endpoint: ScoringClient, published_schema: schemathesis.BaseSchema
) -> None:
    """Generated keys are almost never known ones: this is where a 200 body gets checked."""
    operation = published_schema["/score"]["POST"]
    for key in pipeline_run.simulation.api_keys:
        response = operation.Case(body={"api_key_id": key}).call_and_validate(
            base_url=endpoint.url, timeout=30
        )
        assert response.status_code == 200, response.text[:300]


def test_a_batch_of_known_keys_is_answered_as_declared(
    pipeline_run, endpoint: ScoringClient, published_schema: schemathesis.BaseSchema
) -> None:
    operation = published_schema["/score/batch"]["POST"]
    keys = [{"api_key_id": key} for key in pipeline_run.simulation.api_keys]
    response = operation.Case(body={"keys": [*keys, {"api_key_id": "ab" * 32}]}).call_and_validate(
        base_url=endpoint.url, timeout=30
    )
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["answers"]) == len(keys)


def test_a_null_feature_age_matches_the_declared_schema(
    pipeline_run, endpoint: ScoringClient, published_schema: schemathesis.BaseSchema
) -> None:
    # BentoML publishes an Optional field as its first anyOf branch only: the schema says
    # nullable explicitly (ScoreResponse.feature_age_s), else this answer would not match.
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    real = httpx.post(f"{endpoint.url}/score", json={"api_key_id": incident_key}, timeout=30)
    assert real.status_code == 200, real.text[:300]
    answer = httpx.Response(200, json={**real.json(), "feature_age_s": None}, request=real.request)
    answer.elapsed = real.elapsed
    published_schema["/score"]["POST"].validate_response(answer)


KEY = b"ab" * 32
JSON = "application/json"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b'{"api_key_id": "' + b"a" * 10_000_000 + b'"}', JSON, id="10mb-body"),
        pytest.param(
            b'{"api_key_id": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
            JSON,
            id="nested-objects",
        ),
        pytest.param(b'{"api_key_id": ' + b"9" * 5_000 + b"}", JSON, id="5000-digit-int"),
        pytest.param(b'{"api_key_id": 1e999999}', JSON, id="huge-exponent"),
        pytest.param(b'{"api_key_id": "\xff\xfe' + KEY + b'"}', JSON, id="not-utf8-in-string"),
        pytest.param(b'{"api_key_id": "\\ud800' + KEY + b'"}', JSON, id="lone-surrogate"),
        pytest.param(b'{"api_key_id": "' + KEY + b'\\n"}', JSON, id="trailing-newline"),
        pytest.param(b'{"api_key_id": "' + KEY + b'\\u0000"}', JSON, id="nul-byte"),
        pytest.param(b'{"api_key_id": "' + KEY.upper() + b'"}', JSON, id="uppercase-hex"),
        pytest.param(b'{"api_key_id": "' + KEY + b'a"}', JSON, id="65-hex"),
        pytest.param(b"", JSON, id="empty"),
        pytest.param(
            b"<score><api_key_id>" + KEY + b"</api_key_id></score>",
            "application/xml",
            id="xml",
        ),
        # Refused before anything is unpickled; a plain dict either way.
        pytest.param(
            pickle.dumps({"api_key_id": KEY.decode()}),
            "application/vnd.bentoml+pickle",
            id="pickle",
        ),
        # BentoML parses multipart bodies itself; its parser's 400 for these escapes as a 500
        # unless /score refuses a body that is not JSON first.
        pytest.param(b"garbage", "multipart/form-data", id="multipart-no-boundary"),
        pytest.param(
            b'--x\r\nContent-Disposition: form-data; name="api_key_id"\r\n\r\n'
            + b"a" * 2_000_000
            + b"\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
            id="multipart-2mb-part",
        ),
    ],
)
def test_hostile_request_gets_a_4xx_and_the_endpoint_keeps_scoring(
    pipeline_run, endpoint: ScoringClient, body: bytes, content_type: str
) -> None:
    response = httpx.post(
        f"{endpoint.url}/score", content=body, headers={"content-type": content_type}, timeout=60
    )
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    assert response.text  # says what is wrong
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    assert endpoint.score(incident_key).anomalous


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b'{"api_key_id": "%s"}', "text/plain", id="json-as-text"),
        pytest.param(b"api_key_id=%s", "application/x-www-form-urlencoded", id="form"),
    ],
)
def test_a_known_key_in_another_content_type_is_refused(
    pipeline_run, endpoint: ScoringClient, body: bytes, content_type: str
) -> None:
    """/score declares application/json only; BentoML on its own parses forms too, and
    takes any content type it does not know for JSON."""
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    response = httpx.post(
        f"{endpoint.url}/score",
        content=body % incident_key.encode(),
        headers={"content-type": content_type},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
