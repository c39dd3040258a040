"""Test-only support: ``mini_spoa`` (a tiny SPOP peer for the HAProxy config tests).

The real processes (Redis, mosquitto, HAProxy, the agent) and the stack are the top-level
``devstack`` package, shared with bench/ and scripts/demo.py; the fixtures are in
``tests/conftest.py``.
"""
