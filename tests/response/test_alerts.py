"""The alert record: its committed JSON Schema is the model's, and alerts validate against it."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from qabuse_dagster.response.alerts import (
    ALERT_SCHEMA_ID,
    ALERT_SCHEMA_PATH,
    Alert,
    alert_id,
    alert_json_schema,
    example_alert,
)


def test_the_committed_schema_is_the_models_own() -> None:
    # A change to Alert without regenerating the file (write_alert_schema) fails here.
    assert json.loads(ALERT_SCHEMA_PATH.read_text()) == json.loads(
        json.dumps(alert_json_schema(), sort_keys=True)
    )
    assert alert_json_schema()["$id"] == ALERT_SCHEMA_ID == "qabuse/alert/v1"


def test_an_alert_validates_against_the_schema_and_round_trips() -> None:
    alert = Alert.model_validate(example_alert())
    data = json.loads(alert.to_json())
    Draft202012Validator(json.loads(ALERT_SCHEMA_PATH.read_text())).validate(data)
    assert Alert.model_validate_json(alert.to_json()) == alert
    assert alert.submissions_last_hour == 50 * 2 + 10 * 40
    assert alert.failures_last_hour == 30


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"api_key_id": "not-hex"}, "api_key_id"),
        ({"mode": "maybe"}, "mode"),
        ({"surprise": 1}, "surprise"),
        ({"recent_jobs": example_alert()["recent_jobs"] * 2}, "recent_jobs"),
    ],
)
def test_a_malformed_alert_is_refused_naming_the_field(change: dict, field: str) -> None:
    data = {**example_alert(), **change}
    with pytest.raises(ValidationError) as raised:
        Alert.model_validate(data)
    assert field in str(raised.value)
    errors = list(
        Draft202012Validator(json.loads(ALERT_SCHEMA_PATH.read_text())).iter_errors(
            json.loads(json.dumps(data, default=str))
        )
    )
    assert errors, f"the schema accepts {change}"


def test_an_alert_id_is_stable_and_distinct_per_decision() -> None:
    key = "ab" * 8
    assert alert_id(key, "throttle", 1) == alert_id(key, "throttle", 1)
    assert (
        len({alert_id(key, "throttle", 1), alert_id(key, "cap", 1), alert_id(key, "throttle", 2)})
        == 3
    )
