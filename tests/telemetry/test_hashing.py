"""Keyed hashing: known answers, key and domain separation, networks, key handling."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from pathlib import Path

import pytest

from qabuse_dagster.settings import HASH_KEY_ENV
from qabuse_dagster.telemetry import hashing
from qabuse_dagster.telemetry.hashing import (
    DEMO_HASH_KEY,
    KeyedHasher,
    MissingHashKeyError,
)

KEY = b"0123456789abcdef0123456789abcdef"
_PACKAGED_SCHEMA = (
    Path(__file__).resolve().parents[2]
    / "qabuse_dagster/telemetry/schemas/telemetry-record.v1.schema.json"
)
_SHARED_SCHEMA = Path("/work/shared/contracts/telemetry-record.schema.json")


def _contract_hash_pattern() -> re.Pattern[str]:
    path = _PACKAGED_SCHEMA if _PACKAGED_SCHEMA.exists() else _SHARED_SCHEMA
    if not path.exists():
        return re.compile(r"^[0-9a-f]{16,64}$")
    schema = json.loads(path.read_text())
    return re.compile(schema["properties"]["user"]["pattern"])


def test_known_answer_matches_independent_hmac() -> None:
    expected = hmac.new(KEY, b"user\x00alice@example.org", hashlib.sha256).hexdigest()
    assert KeyedHasher(KEY).hash("alice@example.org", domain="user") == expected


def test_output_is_64_lower_hex_and_matches_contract_pattern() -> None:
    pattern = _contract_hash_pattern()
    hasher = KeyedHasher(KEY)
    values = [
        hasher.hash("x", domain="user"),
        hasher.hash("", domain="api_key"),
        hasher.hash("ünïcødé", domain="code"),
        hasher.hash_network("203.0.113.9"),
    ]
    for value in values:
        assert len(value) == 64
        assert value == value.lower()
        assert pattern.match(value)


def test_different_keys_give_different_hashes() -> None:
    other = KeyedHasher(b"fedcba9876543210fedcba9876543210")
    assert KeyedHasher(KEY).hash("alice", domain="user") != other.hash("alice", domain="user")


def test_same_key_is_deterministic() -> None:
    assert KeyedHasher(KEY).hash("alice", domain="user") == KeyedHasher(KEY).hash(
        "alice", domain="user"
    )


def test_domains_are_separated() -> None:
    hasher = KeyedHasher(KEY)
    hashes = {hasher.hash("same-raw-id", domain=d) for d in ("user", "api_key", "code", "network")}
    assert len(hashes) == 4


def test_domain_boundary_cannot_be_shifted() -> None:
    hasher = KeyedHasher(KEY)
    assert hasher.hash("b", domain="a") != hasher.hash("", domain="ab")


def test_ipv4_same_slash24_hash_equal_and_different_slash24_differ() -> None:
    hasher = KeyedHasher(KEY)
    assert hasher.hash_network("198.51.100.1") == hasher.hash_network("198.51.100.254")
    assert hasher.hash_network("198.51.100.1") != hasher.hash_network("198.51.101.1")


def test_ipv4_network_hash_is_the_network_domain_hash_of_the_cidr() -> None:
    expected = hmac.new(KEY, b"network\x00198.51.100.0/24", hashlib.sha256).hexdigest()
    assert KeyedHasher(KEY).hash_network("198.51.100.77") == expected


def test_ipv6_same_slash48_hash_equal_and_different_slash48_differ() -> None:
    hasher = KeyedHasher(KEY)
    assert hasher.hash_network("2001:db8:abcd:1::1") == hasher.hash_network(
        "2001:db8:abcd:ffff::42"
    )
    assert hasher.hash_network("2001:db8:abcd::1") != hasher.hash_network("2001:db8:abce::1")


def test_ipv4_mapped_ipv6_hashes_like_ipv4() -> None:
    hasher = KeyedHasher(KEY)
    assert hasher.hash_network("::ffff:192.0.2.5") == hasher.hash_network("192.0.2.99")


@pytest.mark.parametrize("bad", ["not-an-ip", "", "256.1.1.1", "10.0.0.0/8"])
def test_hash_network_rejects_non_ip(bad: str) -> None:
    with pytest.raises(ValueError):
        KeyedHasher(KEY).hash_network(bad)


@pytest.mark.parametrize("environ", [{}, {HASH_KEY_ENV: ""}])
def test_from_env_missing_key_raises_with_instructions(environ: dict[str, str]) -> None:
    with pytest.raises(MissingHashKeyError) as excinfo:
        KeyedHasher.from_env(environ)
    message = str(excinfo.value)
    assert "QABUSE_HASH_KEY" in message
    assert "secrets.token_hex(32)" in message
    assert "qabuse demo" in message
    assert isinstance(excinfo.value, RuntimeError)


def test_from_env_reads_the_variable() -> None:
    secret = "a" * 64
    hasher = KeyedHasher.from_env({HASH_KEY_ENV: secret})
    assert hasher.hash("u", domain="user") == KeyedHasher(secret.encode()).hash("u", domain="user")


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HASH_KEY_ENV, raising=False)
    with pytest.raises(MissingHashKeyError):
        KeyedHasher.from_env()
    monkeypatch.setenv(HASH_KEY_ENV, "b" * 32)
    assert KeyedHasher.from_env().hash("u", domain="user")


def test_from_env_short_key_rejected() -> None:
    with pytest.raises(ValueError, match=HASH_KEY_ENV):
        KeyedHasher.from_env({HASH_KEY_ENV: "too-short"})


def test_constructor_short_key_rejected() -> None:
    with pytest.raises(ValueError, match="16"):
        KeyedHasher(b"short")


def test_repr_hides_key() -> None:
    secret = b"very-secret-key-material-0123456789"
    hasher = KeyedHasher(secret)
    for text in (repr(hasher), str(hasher)):
        assert secret.decode() not in text
        assert secret.hex() not in text
        assert "redacted" in text


def test_demo_key_is_fixed_and_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hashing, "_demo_warned", False)
    with caplog.at_level(logging.WARNING, logger=hashing.__name__):
        first = KeyedHasher.demo()
        second = KeyedHasher.demo()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "demo" in warnings[0].getMessage()
    expected = hmac.new(DEMO_HASH_KEY, b"user\x00alice", hashlib.sha256).hexdigest()
    assert first.hash("alice", domain="user") == second.hash("alice", domain="user") == expected
