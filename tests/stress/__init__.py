"""The stress suite: see conftest.py for its modes and harness.py for its producers and checkers."""
