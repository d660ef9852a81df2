"""The internal token's start-up policy (common/internal_token.py): placeholders and a
missing token are refused, with messages that name the way out and never the value."""

from __future__ import annotations

import secrets

import pytest

from pdserve.common.internal_token import placeholder_problem, start_problem


@pytest.mark.parametrize("token", [
    "change-me", "CHANGE_ME", "changeme", "<change-me>", "change-me-openssl-rand-hex-16",
    "replace-me", "placeholder", "<your-token>", "your_token", "token", "secret", "Secret!",
    "password", "${PDSERVE_INTERNAL_TOKEN}", "${SOME_OTHER_VAR}", "$(openssl rand -hex 16)",
    "openssl rand -hex 16", "***", "", "  ",
])
def test_placeholders_are_refused_without_echoing_them(token: str) -> None:
    problem = placeholder_problem(token)
    assert problem is not None and "openssl rand -hex 16" in problem
    # one of four fixed texts whatever the value: nothing of it is echoed
    assert problem in {placeholder_problem(t) for t in ("change-me", "", "${X}", "openssl rand")}


@pytest.mark.parametrize("token", [secrets.token_hex(16), "t-5f1c9e7a2b4d8063", "s3cr3t",
                                   "deploy-test-token", "t0"])
def test_real_looking_tokens_pass(token: str) -> None:
    assert placeholder_problem(token) is None


def test_no_token_is_refused_naming_both_ways_out() -> None:
    for token in (None, ""):
        problem = start_problem(token, False, who="a worker")
        assert problem is not None and problem.startswith("no internal token: a worker")
        for way in ("--internal-token", "PDSERVE_INTERNAL_TOKEN", "--insecure-no-token"):
            assert way in problem


def test_insecure_runs_without_a_token_but_not_beside_one() -> None:
    assert start_problem(None, True, who="a worker") is None
    assert start_problem("a1b2c3d4", False, who="a worker") is None
    both = start_problem("a1b2c3d4", True, who="a worker")
    assert both is not None and "--insecure-no-token" in both and "a1b2c3d4" not in both
