"""The stress suite's knobs: how long each stress run lasts beyond its minimum.

CI runs the bounded mode (each run stops once its ring has been lapped ``MIN_LAPS`` times).
``--stress-seconds N`` (or ``BPFRING_STRESS_SECONDS=N``, which also reaches tests/test_faults.py
and tests/test_leaks.py) keeps every run going for at least N seconds: the long mode.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stress-seconds",
        type=float,
        default=None,
        help="run each stress test for at least this many seconds (default: BPFRING_STRESS_SECONDS or 0, "
        "the bounded CI mode)",
    )


@pytest.fixture(scope="session")
def stress_seconds(request: pytest.FixtureRequest) -> float:
    """Seconds each stress run lasts at least (0: stop as soon as the ring has been lapped enough)."""
    from stress.harness import env_stress_seconds

    option = request.config.getoption("--stress-seconds", default=None)
    return env_stress_seconds() if option is None else float(option)
