"""Feast entities: who a feature row describes."""

from feast import Entity, ValueType

api_key = Entity(
    name="api_key",
    join_keys=["api_key_id"],
    value_type=ValueType.STRING,
    description="An API key, by its keyed HMAC-SHA256 hash (never the key id or secret).",
)

user = Entity(
    name="user",
    join_keys=["user"],
    value_type=ValueType.STRING,
    description="A user, by the keyed HMAC-SHA256 hash of their id (never the raw id).",
)
