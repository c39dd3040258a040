"""Test-only support: ``mini_spoa`` (a tiny SPOP peer for the HAProxy config tests).

The real processes (Redis, mosquitto, HAProxy, the agent) and the stack are the top-level
``devstack`` package, shared with bench/ and scripts/demo.py; the fixtures are in
``tests/conftest.py``.
"""

import os

#: The suite runs against a mypyc build (``MQTT_AFFINITY_COMPILED``, see tests/conftest.py and
#: tests/test_compiled.py). Compiled code checks declared argument and attribute types at run
#: time, so an ill-typed call (one mypy would reject) may raise TypeError before the codec's own
#: check raises LocalProtocolError; and replacing a module function does not change the calls
#: made inside that compiled module.
COMPILED = bool(os.environ.get("MQTT_AFFINITY_COMPILED"))
