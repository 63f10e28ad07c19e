"""Under CI a missing test dependency fails the run; elsewhere it skips, saying why."""

from __future__ import annotations

import pytest
from _pytest.outcomes import Failed, Skipped

from tests import ci


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_a_missing_dependency_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(Failed, match="CI=true and needs OpenSSH"):
        ci.missing("needs OpenSSH")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_dependency_skips_elsewhere(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(Skipped, match="needs OpenSSH"):
        ci.missing("needs OpenSSH")


def test_ci_script_runs_the_suite_under_ci_true():
    from pathlib import Path

    script = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "export CI=true" in script and "make test" in script
