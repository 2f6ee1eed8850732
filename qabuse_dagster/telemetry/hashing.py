"""Keyed hashing of identifiers, so no raw user, key, script or address leaves the client.

Every identifier in a telemetry record is an HMAC-SHA256 of the raw value under a
deployment-wide secret (``QABUSE_HASH_KEY``). All collectors of one deployment share the
key, so one user hashes to the same value everywhere, while nobody without the key can
test a guessed identifier against the data. Each kind of identifier is hashed in its own
domain, so a string used as a user id and as an API key id gives unrelated hashes.

Standard library only: this module runs inside users' processes.

Example:
    >>> hasher = KeyedHasher(b"k" * 32)
    >>> len(hasher.hash("alice", domain="user"))
    64
    >>> hasher.hash_network("192.0.2.7") == hasher.hash_network("192.0.2.200")
    True
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping

from qabuse_dagster.settings import HASH_KEY_ENV

__all__ = [
    "DEMO_HASH_KEY",
    "HASH_DOMAINS",
    "HASH_KEY_ENV",
    "MIN_KEY_BYTES",
    "RECOMMENDED_KEY_CHARS",
    "KeyedHasher",
    "MissingHashKeyError",
]

logger = logging.getLogger(__name__)

# 16 bytes (128 bits) is the least an HMAC key should carry; the environment variable
# asks for more (32 characters) because people type low-entropy text there.
MIN_KEY_BYTES = 16
RECOMMENDED_KEY_CHARS = 32

#: PUBLIC key for demos and tests only. It is printed here, in a public repository, so
#: hashes made with it protect nothing: anyone can recompute them from guessed ids.
DEMO_HASH_KEY = b"qabuse-public-demo-key-not-a-secret-do-not-deploy"

#: The domains qabuse hashes in; another domain is allowed but likely a typo.
HASH_DOMAINS = ("user", "api_key", "code", "network")

_IPV4_PREFIX = 24
_IPV6_PREFIX = 48

_demo_warned = False


class MissingHashKeyError(RuntimeError):
    """``QABUSE_HASH_KEY`` is not set, so identifiers cannot be hashed."""

    def __init__(self) -> None:
        super().__init__(
            f"{HASH_KEY_ENV} is not set. qabuse hashes every user, API key, script and "
            f"network with a keyed HMAC before it leaves the client, and needs a secret "
            f"of at least {RECOMMENDED_KEY_CHARS} characters, the same for all collectors "
            f"of one deployment (otherwise one user hashes differently on each). Make "
            f'one with: python -c "import secrets; print(secrets.token_hex(32))" and set '
            f"it as {HASH_KEY_ENV} in every collector's environment. `qabuse demo` does "
            f"not need it: it uses a public demo key instead."
        )


class KeyedHasher:
    """HMAC-SHA256 of identifiers under one secret key, separated by domain.

    Args:
        key: The secret, at least 16 bytes.

    Raises:
        ValueError: If ``key`` is shorter than 16 bytes.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"hash key is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed "
                f'(generate one with: python -c "import secrets; print(secrets.token_hex(32))")'
            )
        self._key = bytes(key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KeyedHasher:
        """Build the hasher from ``QABUSE_HASH_KEY``.

        Args:
            environ: Where to look; ``os.environ`` when None.

        Returns:
            A hasher keyed with the variable's UTF-8 bytes.

        Raises:
            MissingHashKeyError: If the variable is missing or empty.
            ValueError: If it is shorter than 32 characters.
        """
        env = os.environ if environ is None else environ
        value = env.get(HASH_KEY_ENV, "")
        if not value:
            raise MissingHashKeyError()
        if len(value) < RECOMMENDED_KEY_CHARS:
            raise ValueError(
                f"{HASH_KEY_ENV} has {len(value)} characters; it must have at least "
                f"{RECOMMENDED_KEY_CHARS}. Generate one with: "
                f'python -c "import secrets; print(secrets.token_hex(32))"'
            )
        return cls(value.encode("utf-8"))

    @classmethod
    def demo(cls) -> KeyedHasher:
        """A hasher with the public :data:`DEMO_HASH_KEY`, for demos and tests.

        Logs a warning the first time in a process, since its hashes protect nothing.
        """
        global _demo_warned
        if not _demo_warned:
            _demo_warned = True
            logger.warning(
                "using the PUBLIC demo hash key: identifiers hashed with it are not "
                "protected; set %s for real telemetry",
                HASH_KEY_ENV,
            )
        return cls(DEMO_HASH_KEY)

    @property
    def is_demo(self) -> bool:
        """Whether this hasher uses the public demo key (whose hashes protect nothing)."""
        return hmac.compare_digest(self._key, DEMO_HASH_KEY)

    def hash(self, value: str, *, domain: str) -> str:
        """Hash one identifier.

        Args:
            value: The raw identifier.
            domain: What kind of identifier it is: ``user``, ``api_key``, ``code`` or
                ``network``. Part of the MAC input, so domains never collide.

        Returns:
            64 lower-case hex characters: HMAC-SHA256 of ``domain + "\\x00" + value``.
        """
        if "\x00" in domain:
            raise ValueError("domain must not contain NUL")
        message = f"{domain}\x00{value}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def hash_network(self, ip: str) -> str:
        """Hash the network an address belongs to, not the address itself.

        Args:
            ip: An IPv4 or IPv6 address.

        Returns:
            The ``network``-domain hash of its /24 (IPv4) or /48 (IPv6) network, so
            hosts of one site or NAT pool share a hash.

        Raises:
            ValueError: If ``ip`` is not an IP address.
        """
        address = ipaddress.ip_address(ip.strip())
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # ::ffff:a.b.c.d is the same host as a.b.c.d; hash them alike.
            address = address.ipv4_mapped
        prefix = _IPV4_PREFIX if address.version == 4 else _IPV6_PREFIX
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        return self.hash(str(network), domain="network")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key=<redacted>)"
