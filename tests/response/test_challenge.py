"""Challenge and proof tokens: signed, expiring, bound to one key, never confused."""

from __future__ import annotations

import pytest
from support.decision_records import KEY, OTHER_KEY

from qabuse_dagster import settings
from qabuse_dagster.response.challenge import (
    ChallengeExpired,
    ChallengeSigner,
    ChallengeTampered,
    ChallengeWrongKey,
)

SECRET = b"k" * 32


class Clock:
    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def test_a_challenge_verifies_for_its_key() -> None:
    clock = Clock()
    signer = ChallengeSigner(SECRET, clock=clock)
    token = signer.issue(KEY, nonce="n-1", decision_seq=7, ttl_s=60)
    challenge = signer.verify(token, KEY)
    assert (challenge.api_key_id, challenge.nonce, challenge.decision_seq) == (KEY, "n-1", 7)
    assert challenge.expires_at_ms - challenge.issued_at_ms == 60_000


def test_two_challenges_to_one_key_differ() -> None:
    signer = ChallengeSigner(SECRET)
    assert signer.issue(KEY) != signer.issue(KEY)


def test_an_expired_challenge_is_refused() -> None:
    clock = Clock()
    signer = ChallengeSigner(SECRET, clock=clock)
    token = signer.issue(KEY, ttl_s=60)
    clock.now_ms += 59_999
    signer.verify(token, KEY)
    clock.now_ms += 1
    with pytest.raises(ChallengeExpired, match="expired"):
        signer.verify(token, KEY)


def test_a_challenge_for_another_key_is_refused() -> None:
    signer = ChallengeSigner(SECRET)
    with pytest.raises(ChallengeWrongKey, match="another api key"):
        signer.verify(signer.issue(OTHER_KEY), KEY)


@pytest.mark.parametrize("where", [0, 10, -5])  # the payload's start, middle; the signature
def test_a_tampered_challenge_is_refused(where: int) -> None:
    signer = ChallengeSigner(SECRET, clock=Clock())
    token = signer.issue(KEY, nonce="fixed")
    where %= len(token)
    # "A" and "Q" differ in a high bit of the 6 a base64 character holds, never a pad bit.
    flipped = "A" if token[where] != "A" else "Q"
    tampered = token[:where] + flipped + token[where + 1 :]
    with pytest.raises(ChallengeTampered):
        signer.verify(tampered, KEY)


@pytest.mark.parametrize("token", ["", "garbage", "a.b", "\u00e9t\u00e9.x", "." * 200])
def test_junk_is_tampered_never_a_crash(token: str) -> None:
    with pytest.raises(ChallengeTampered):
        ChallengeSigner(SECRET).verify_proof(token, KEY)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    forged = ChallengeSigner(b"x" * 32).issue(KEY)
    with pytest.raises(ChallengeTampered, match="bad signature"):
        ChallengeSigner(SECRET).verify(forged, KEY)


def test_a_challenge_is_not_a_proof_and_a_proof_is_not_a_challenge() -> None:
    signer = ChallengeSigner(SECRET)
    challenge = signer.issue(KEY)
    proof = signer.solve(challenge, KEY)
    with pytest.raises(ChallengeTampered):
        signer.verify_proof(challenge, KEY)
    with pytest.raises(ChallengeTampered):
        signer.verify(proof, KEY)


def test_a_proof_carries_the_solved_challenge_and_expires_on_its_own() -> None:
    clock = Clock()
    signer = ChallengeSigner(SECRET, clock=clock)
    challenge = signer.issue(KEY, nonce="n-2", decision_seq=3, ttl_s=60)
    clock.now_ms += 30_000
    proof = signer.verify_proof(signer.solve(challenge, KEY, ttl_s=600), KEY)
    assert (proof.nonce, proof.decision_seq, proof.solved_at_ms) == ("n-2", 3, clock.now_ms)
    clock.now_ms += 599_999  # long after the challenge itself expired
    assert signer.verify_proof(signer.solve(signer.issue(KEY), KEY), KEY).api_key_id == KEY
    token = signer.solve(signer.issue(KEY), KEY, ttl_s=1)
    clock.now_ms += 1_000
    with pytest.raises(ChallengeExpired):
        signer.verify_proof(token, KEY)


def test_an_expired_or_foreign_challenge_cannot_be_solved() -> None:
    clock = Clock()
    signer = ChallengeSigner(SECRET, clock=clock)
    token = signer.issue(KEY, ttl_s=1)
    with pytest.raises(ChallengeWrongKey):
        signer.solve(token, OTHER_KEY)
    clock.now_ms += 1_000
    with pytest.raises(ChallengeExpired):
        signer.solve(token, KEY)


def test_a_proof_for_another_key_is_refused() -> None:
    signer = ChallengeSigner(SECRET)
    proof = signer.solve(signer.issue(OTHER_KEY), OTHER_KEY)
    with pytest.raises(ChallengeWrongKey):
        signer.verify_proof(proof, KEY)


def test_the_default_secret_is_the_deployments_signing_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, "a" * 40)
    token = ChallengeSigner().issue(KEY)
    assert ChallengeSigner(b"a" * 40).verify(token, KEY).api_key_id == KEY
    monkeypatch.setenv(settings.SIGNING_KEY_ENV, "b" * 40)
    with pytest.raises(ChallengeTampered):
        ChallengeSigner().verify(token, KEY)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        ChallengeSigner(b"short")
