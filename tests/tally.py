"""The counts a corpus of bad inputs reports at the end of its module (`pytest -s` shows them),
and the promise it holds: none of the `must_be_zero` counts may be above 0."""
from __future__ import annotations

import pytest


def tally_fixture(name: str, tally: dict, must_be_zero: tuple[str, ...]):
    """A module-scoped autouse fixture that prints `tally` and asserts the promise after the
    module's tests ran. Assign it to a module-level name."""
    @pytest.fixture(scope="module", autouse=True)
    def report():
        yield
        print(f"\n{name}: " + ", ".join(f"{v} {k}" for k, v in tally.items()))
        assert all(tally[k] == 0 for k in must_be_zero), tally
    return report
