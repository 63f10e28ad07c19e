"""What a test does when something it needs is not installed: skip on a developer's machine, fail in CI.

CI (`CI=true`, set by .ci/run) installs every test dependency; when one of those installs fails, the tests
that need it must turn the run red with the reason instead of skipping out of sight."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip the test (fail it under CI) because `reason`: something it needs is not installed."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)
