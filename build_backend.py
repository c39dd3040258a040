"""PEP 517 build backend: setuptools', asking for mypy (mypyc) only where setup.py may use it.

A wheel build needs mypy to compile the hot modules (see setup.py); an editable install never
compiles and a pure build (``MQTT_AFFINITY_PURE=1``) does not either, so neither has to
install mypy into its isolated build environment.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other hook unchanged)

#: The mypy releases the compiled build was checked with (tests/test_compiled.py).
MYPYC_REQUIREMENT = "mypy>=2.4,<3"


def get_requires_for_build_wheel(config_settings: dict[str, str | list[str]] | None = None) -> list[str]:
    requires = list(_setuptools.get_requires_for_build_wheel(config_settings))
    if os.environ.get("MQTT_AFFINITY_PURE", "") in ("", "0"):
        requires.append(MYPYC_REQUIREMENT)
    return requires
