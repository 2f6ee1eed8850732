"""Who may call the response layer's HTTP endpoints: principals, roles and bearer tokens.

Four roles:

* ``gateway``: the API gateway asking whether a submission may go through;
* ``analyst``: reads counters and queues, takes and lifts mitigations, rules on appeals;
* ``approver``: the second principal who approves a proposed rotation or revocation;
* ``owner``: a key's owner, bound to their api keys: they may appeal and solve
  challenges for those keys only.

Principals and their tokens live in one JSON file (:func:`settings.tokens_file`), a list
of entries such as ``{"principal": "alice", "roles": ["analyst"], "token_sha256": "..."}``
(``"role": "analyst"`` is accepted for one role; an owner adds ``"api_keys": [...]``). Only
the SHA-256 of each token is stored; :func:`add_token` makes one and returns the
plaintext once. A presented token is hashed and compared with every stored hash with
:func:`hmac.compare_digest`, so the time taken does not depend on which entry matched.

Example:
    >>> tokens = TokenStore.from_plaintext({"t" * 32: Principal("gw", frozenset({"gateway"}))})
    >>> tokens.authenticate("t" * 32).name
    'gw'
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from qabuse_dagster import settings
from qabuse_dagster.telemetry.contract import HEX_HASH_PATTERN

__all__ = [
    "ROLES",
    "Principal",
    "Role",
    "TokenEntry",
    "TokenStore",
    "add_token",
    "authenticate_request",
    "bearer_token",
    "hash_token",
    "require_role",
]

logger = logging.getLogger(__name__)

Role = Literal["gateway", "analyst", "approver", "owner"]
ROLES: tuple[Role, ...] = ("gateway", "analyst", "approver", "owner")

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_API_KEY_ID = re.compile(HEX_HASH_PATTERN)


@dataclass(frozen=True)
class Principal:
    """A named caller with its roles, and for an owner, the api keys it owns.

    Attributes:
        name: The principal's name, as ledger entries record it in ``actor``.
        roles: Some of :data:`ROLES`.
        api_keys: The keyed-hash ids of the keys an owner may act on.
    """

    name: str
    roles: frozenset[str]
    api_keys: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.name or self.name == "system":
            # "system" is the ledger's actor for automated steps; no person may pose as it.
            raise ValueError(f"a principal needs a name other than 'system', got {self.name!r}")
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ValueError(
                f"principal {self.name!r}: roles {sorted(self.roles)} must be some of {ROLES}"
            )
        bad = [key for key in self.api_keys if not _API_KEY_ID.match(key)]
        if bad:
            raise ValueError(
                f"principal {self.name!r}: api_keys must be hex key ids, got {bad[:3]}"
            )

    def has_role(self, *roles: str) -> bool:
        """Whether the principal holds any of ``roles``."""
        return any(role in self.roles for role in roles)

    def owns(self, api_key_id: str) -> bool:
        """Whether the principal is an owner bound to ``api_key_id``."""
        return "owner" in self.roles and api_key_id in self.api_keys


@dataclass(frozen=True)
class TokenEntry:
    """One entry of the tokens file: a principal and the SHA-256 (hex) of its token."""

    principal: Principal
    token_sha256: str

    def __post_init__(self) -> None:
        if not _SHA256_HEX.match(self.token_sha256):
            raise ValueError(
                f"principal {self.principal.name!r}: token_sha256 must be 64 lowercase hex digits"
            )

    def to_dict(self) -> dict[str, Any]:
        """The entry as the tokens file holds it."""
        out: dict[str, Any] = {
            "principal": self.principal.name,
            "roles": sorted(self.principal.roles),
            "token_sha256": self.token_sha256,
        }
        if self.principal.api_keys:
            out["api_keys"] = sorted(self.principal.api_keys)
        return out

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> TokenEntry:
        """An entry from the tokens file's JSON.

        Raises:
            ValueError: A field is missing, of the wrong type, or names an unknown role.
        """
        if not isinstance(item, Mapping):
            raise ValueError(f"a tokens file entry must be an object, got {type(item).__name__}")
        name, digest = item.get("principal"), item.get("token_sha256")
        roles = item.get("roles", [item["role"]] if "role" in item else None)
        keys = item.get("api_keys", [])
        if not isinstance(name, str) or not isinstance(digest, str):
            raise ValueError("a tokens file entry needs string 'principal' and 'token_sha256'")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError(f"principal {name!r}: give 'role' (a string) or 'roles' (a list)")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"principal {name!r}: 'api_keys' must be a list of key ids")
        return cls(Principal(name, frozenset(roles), frozenset(keys)), digest)


def hash_token(token: str) -> str:
    """The SHA-256 (hex) of a bearer token: what the tokens file stores."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The principals the tokens file names, looked up by bearer token.

    Args:
        entries: The tokens file's entries.
    """

    def __init__(self, entries: Iterable[TokenEntry] = ()) -> None:
        self._entries = tuple(entries)
        seen: set[str] = set()
        for entry in self._entries:
            if entry.token_sha256 in seen:
                raise ValueError(f"a token of {entry.principal.name!r} is listed twice")
            seen.add(entry.token_sha256)
        # Bytes, so that compare_digest never meets a non-ASCII str.
        self._digests = tuple(
            (entry.token_sha256.encode(), entry.principal) for entry in self._entries
        )

    @classmethod
    def load(cls, path: Path | None = None) -> TokenStore:
        """The store in ``path`` (default :func:`settings.tokens_file`); empty if it is absent.

        Raises:
            ValueError: The file is not a JSON list of valid entries.
        """
        path = path or settings.tokens_file()
        if not path.exists():
            logger.warning("no tokens file at %s: every authenticated call is refused", path)
            return cls()
        return cls(_read_entries(path))

    @classmethod
    def from_plaintext(cls, tokens: Mapping[str, Principal]) -> TokenStore:
        """A store from plaintext tokens (tests, an embedded deployment built in code)."""
        return cls(TokenEntry(principal, hash_token(token)) for token, principal in tokens.items())

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        return self._entries

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal whose token ``token`` is, or None.

        Every stored hash is compared, matched or not, in constant time per comparison.
        """
        if not token:
            return None
        digest = hash_token(token).encode()
        found: Principal | None = None
        for stored, principal in self._digests:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _read_entries(path: Path) -> list[TokenEntry]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of token entries")
    try:
        return [TokenEntry.from_dict(item) for item in data]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def add_token(
    principal: str,
    roles: Iterable[str],
    *,
    api_keys: Iterable[str] = (),
    path: Path | None = None,
) -> str:
    """Make a bearer token for ``principal``, store its hash, and return the plaintext.

    The plaintext is not kept anywhere: show it to the person once. The file is rewritten
    atomically (mode 0600) under a lock, so two concurrent calls both land.

    Args:
        principal: The principal's name.
        roles: Some of :data:`ROLES`.
        api_keys: The keys an owner is bound to.
        path: The tokens file; :func:`settings.tokens_file` when None.

    Raises:
        ValueError: An unknown role, a malformed key id, or an unreadable tokens file.
    """
    path = path or settings.tokens_file()
    token = secrets.token_urlsafe(32)
    entry = TokenEntry(
        Principal(principal, frozenset(roles), frozenset(api_keys)), hash_token(token)
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(path) + ".lock"):
        entries = _read_entries(path) if path.exists() else []
        text = json.dumps([e.to_dict() for e in [*entries, entry]], indent=2) + "\n"
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(scratch, path)
    logger.info("added a token for %s (%s)", principal, ", ".join(sorted(entry.principal.roles)))
    return token


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = conn.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def authenticate_request(
    conn: HTTPConnection, tokens: TokenStore, roles: Iterable[str]
) -> Principal:
    """The principal calling, if it holds one of ``roles``.

    Raises:
        HTTPException: 401 (with ``WWW-Authenticate: Bearer``) for a missing, malformed or
            unknown token; 403 for a principal without any of ``roles``.
    """
    principal = tokens.authenticate(bearer_token(conn))
    if principal is None:
        raise HTTPException(
            401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    wanted = tuple(roles)
    if not principal.has_role(*wanted):
        raise HTTPException(403, f"this needs the role {' or '.join(wanted)}")
    return principal


def require_role(tokens: TokenStore, *roles: Role) -> Callable[[HTTPConnection], Principal]:
    """A dependency that resolves the caller to a principal holding one of ``roles``.

    Usable as a FastAPI ``Depends`` or called directly in a Starlette endpoint.

    Example:
        >>> require_role(TokenStore(), "analyst").__name__
        'require_analyst'
    """
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")

    def dependency(conn: HTTPConnection) -> Principal:
        return authenticate_request(conn, tokens, roles)

    dependency.__name__ = "require_" + "_or_".join(roles)
    return dependency
