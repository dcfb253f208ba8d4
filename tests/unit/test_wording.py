"""Counts read as sentences: one of a thing is singular, any other number plural."""

from __future__ import annotations

import pytest

from service.wording import is_are, plural, running_count


@pytest.mark.parametrize(("n", "expected"), [
    (0, "0 local jobs are running"), (1, "1 local job is running"),
    (2, "2 local jobs are running"), (-1, "-1 local jobs are running"),
])
def test_a_count_agrees_with_its_noun_and_verb(n: int, expected: str) -> None:
    assert running_count(n, "local job") == expected
    assert f"{plural(n, 'local job')} {is_are(n)} running" == expected


def test_a_noun_with_its_own_plural() -> None:
    assert [plural(n, "dispatch", "dispatches") for n in (1, 2)] == ["1 dispatch", "2 dispatches"]
