"""Challenge tokens: signed, expiring proof that a key's owner re-authenticated.

A key under the ``challenge`` rung is refused with a *challenge*: a token naming the key,
a random nonce, the ledger ``seq`` of the challenge decision and an expiry, signed with a
key derived from the deployment's signing secret. The key's owner completes it at the
gateway's solve endpoint (authenticated with their own bearer token, standing in for
2FA or a CAPTCHA) and gets back a *proof*: a second signed token, with an expiry of its
own, that the client then sends with each submission (``x-qabuse-challenge-proof``). Both
are checked with the secret alone, so the gateway verifies a proof without any I/O.

Challenges and proofs are signed with different salts, so one never passes for the other.
:meth:`ChallengeSigner.verify` and :meth:`ChallengeSigner.verify_proof` tell apart a
token that expired (:class:`ChallengeExpired`), one that was altered, forged or is of the
wrong kind (:class:`ChallengeTampered`) and one issued for another key
(:class:`ChallengeWrongKey`).

Example:
    >>> signer = ChallengeSigner(b"s" * 32, clock=lambda: 1_000)
    >>> token = signer.issue("ab" * 8, decision_seq=7)
    >>> proof = signer.solve(token, "ab" * 8)
    >>> solved = signer.verify_proof(proof, "ab" * 8)
    >>> solved.decision_seq, solved.api_key_id == "ab" * 8
    (7, True)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from qabuse_dagster import settings

__all__ = [
    "DEFAULT_CHALLENGE_TTL_S",
    "DEFAULT_PROOF_TTL_S",
    "Challenge",
    "ChallengeError",
    "ChallengeExpired",
    "ChallengeSigner",
    "ChallengeTampered",
    "ChallengeWrongKey",
    "Proof",
    "epoch_ms",
]

#: How long an owner has to complete a challenge (the ladder's ``token_ttl_s`` default).
DEFAULT_CHALLENGE_TTL_S = 900.0
#: How long a solved challenge lets the key's submissions through before it must be redone.
DEFAULT_PROOF_TTL_S = 3600.0

# Domain separation: the challenge key is not the ledger's MAC key, though both derive
# from the one signing secret.
_KEY_CONTEXT = b"qabuse-challenge-v1"
_CHALLENGE_SALT = b"qabuse.challenge"
_PROOF_SALT = b"qabuse.challenge-proof"


def epoch_ms() -> int:
    """Now, in epoch milliseconds: the clock every part of the response layer defaults to."""
    return time.time_ns() // 1_000_000


class ChallengeError(ValueError):
    """A challenge or proof token that does not let the submission through."""

    #: A short, stable name of the failure for JSON answers and counters.
    code = "invalid"


class ChallengeExpired(ChallengeError):
    """The token was genuine but its time is up: ask for a new challenge."""

    code = "expired"


class ChallengeTampered(ChallengeError):
    """The token was altered, forged, malformed, or is a challenge where a proof is due."""

    code = "tampered"


class ChallengeWrongKey(ChallengeError):
    """The token is genuine but was issued for another api key."""

    code = "wrong_key"


@dataclass(frozen=True)
class Challenge:
    """A challenge as issued: what the owner must complete.

    Attributes:
        api_key_id: The challenged key.
        nonce: Random, so that two challenges to one key differ.
        issued_at_ms: When it was issued (epoch milliseconds).
        expires_at_ms: When it can no longer be solved.
        decision_seq: Ledger ``seq`` of the challenge decision it answers, if any; a proof
            of it stops counting once another challenge decision replaces that one.
    """

    api_key_id: str
    nonce: str
    issued_at_ms: int
    expires_at_ms: int
    decision_seq: int | None = None


@dataclass(frozen=True)
class Proof:
    """A solved challenge: what lets the key's submissions through until it expires.

    Attributes:
        api_key_id: The key whose challenge was solved.
        nonce: The solved challenge's nonce.
        decision_seq: Ledger ``seq`` of the challenge decision that was solved, if any.
        solved_at_ms: When the owner solved it.
        expires_at_ms: When the proof stops counting.
    """

    api_key_id: str
    nonce: str
    decision_seq: int | None
    solved_at_ms: int
    expires_at_ms: int


class ChallengeSigner:
    """Issues and checks challenge and proof tokens (see the module docstring).

    Args:
        secret: The deployment's signing secret; :func:`settings.signing_key` when None.
            The tokens are signed with HMAC-SHA256 under a key derived from it.
        clock: Epoch milliseconds, for tests; the wall clock by default.
    """

    def __init__(
        self, secret: bytes | None = None, *, clock: Callable[[], int] | None = None
    ) -> None:
        root = settings.signing_key() if secret is None else secret
        if len(root) < 32:
            raise ValueError(f"the signing secret is {len(root)} bytes: give at least 32")
        key = hmac.new(root, _KEY_CONTEXT, hashlib.sha256).digest()
        signer = {"digest_method": hashlib.sha256}
        self._challenges = URLSafeSerializer(key, salt=_CHALLENGE_SALT, signer_kwargs=signer)
        self._proofs = URLSafeSerializer(key, salt=_PROOF_SALT, signer_kwargs=signer)
        self._clock = clock or epoch_ms

    def issue(
        self,
        api_key_id: str,
        *,
        nonce: str | None = None,
        decision_seq: int | None = None,
        ttl_s: float = DEFAULT_CHALLENGE_TTL_S,
    ) -> str:
        """A challenge token for ``api_key_id``, valid for ``ttl_s`` seconds.

        Args:
            api_key_id: The challenged key.
            nonce: A caller's nonce; a random one when None.
            decision_seq: Ledger ``seq`` of the challenge decision it answers.
            ttl_s: Lifetime in seconds (positive).
        """
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        now = self._clock()
        payload = {
            "k": api_key_id,
            "n": nonce if nonce is not None else secrets.token_urlsafe(12),
            "i": now,
            "e": now + round(ttl_s * 1000),
            "s": decision_seq,
        }
        return str(self._challenges.dumps(payload))

    def verify(self, token: str, api_key_id: str) -> Challenge:
        """The challenge ``token`` carries, if it is genuine, unexpired and for ``api_key_id``.

        Raises:
            ChallengeTampered: Altered, forged or malformed, or not a challenge token.
            ChallengeWrongKey: Issued for another key.
            ChallengeExpired: Past its expiry.
        """
        fields = _load(self._challenges, token, "challenge")
        challenge = Challenge(fields["k"], fields["n"], fields["i"], fields["e"], fields["s"])
        self._check(challenge.api_key_id, challenge.expires_at_ms, api_key_id, "challenge")
        return challenge

    def solve(self, token: str, api_key_id: str, *, ttl_s: float = DEFAULT_PROOF_TTL_S) -> str:
        """The proof token for a solved challenge, once the caller has authenticated the owner.

        Args:
            token: The challenge token the owner was given.
            api_key_id: The key the owner solves it for.
            ttl_s: How long the proof lets submissions through (positive).

        Raises:
            ChallengeError: As :meth:`verify`, if the challenge cannot be solved.
        """
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        challenge = self.verify(token, api_key_id)
        now = self._clock()
        payload = {
            "k": challenge.api_key_id,
            "n": challenge.nonce,
            "i": now,
            "e": now + round(ttl_s * 1000),
            "s": challenge.decision_seq,
        }
        return str(self._proofs.dumps(payload))

    def verify_proof(self, token: str, api_key_id: str) -> Proof:
        """The solved challenge ``token`` proves, if genuine, unexpired and for ``api_key_id``.

        Raises:
            ChallengeTampered: Altered, forged or malformed, or not a proof token (a
                challenge token is refused here: it proves nothing was solved).
            ChallengeWrongKey: The proof is for another key.
            ChallengeExpired: Past its expiry.
        """
        fields = _load(self._proofs, token, "proof")
        proof = Proof(fields["k"], fields["n"], fields["s"], fields["i"], fields["e"])
        self._check(proof.api_key_id, proof.expires_at_ms, api_key_id, "proof")
        return proof

    def _check(self, issued_for: str, expires_at_ms: int, api_key_id: str, kind: str) -> None:
        # The key first: an expired token for another key is, above all, for another key.
        if issued_for != api_key_id:
            raise ChallengeWrongKey(f"the {kind} was issued for another api key")
        now = self._clock()
        if now >= expires_at_ms:
            raise ChallengeExpired(f"the {kind} expired {(now - expires_at_ms) / 1000:.0f} s ago")


def _load(serializer: URLSafeSerializer, token: str, kind: str) -> dict[str, Any]:
    """The signed payload of ``token``, its fields type-checked."""
    try:
        fields = serializer.loads(token)
    except BadSignature:
        raise ChallengeTampered(f"not a genuine {kind} token (bad signature)") from None
    except Exception:
        # Whatever else a hostile string makes the decoder raise, it is a bad token, not a 500.
        raise ChallengeTampered(f"not a readable {kind} token") from None
    ints = ("i", "e")
    well_formed = (
        isinstance(fields, dict)
        and isinstance(fields.get("k"), str)
        and isinstance(fields.get("n"), str)
        and all(type(fields.get(name)) is int for name in ints)
        and (fields.get("s") is None or type(fields.get("s")) is int)
    )
    if not well_formed:
        # Only we sign tokens, so a well-signed malformed one means a bug or a stolen key.
        raise ChallengeTampered(f"the {kind} token's payload is malformed")
    return dict(fields)
