"""Real servers the suite needs: skipped where missing, except under CI, where they must be.

CI (``CI`` set) installs every server the tests start (``.ci/run``), so there a missing
one is a failure, never a silent skip.
"""

from __future__ import annotations

import os

import pytest


def require_installed(found: bool, what: str, debian_package: str, tested: str) -> None:
    """Skip when ``found`` is false; under CI fail instead, naming what goes untested."""
    if found:
        return
    reason = f"{what} is not installed (Debian: apt-get install {debian_package})"
    if os.environ.get("CI"):
        pytest.fail(f"CI must test {tested}, but {reason}", pytrace=False)
    pytest.skip(reason)
