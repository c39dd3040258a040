"""Test support: real processes (Redis, mosquitto, HAProxy, the agent) for the test suite.

See ``tests/support/procs.py`` for the classes and ``tests/conftest.py`` for the fixtures.
"""
