"""PEP 517 build backend: setuptools', asking for mypy (mypyc) only where setup.py may use it.

A wheel build compiles the hot modules with mypyc when it can (see setup.py), so it asks for
mypy in its isolated build environment; an editable install never compiles, and neither does a
build that could not (:func:`pure_reason`), so neither has to install mypy.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other hook unchanged)

#: The mypy releases the compiled build was checked with (tests/test_compiled.py).
MYPYC_REQUIREMENT = "mypy>=2.4,<3"


def pure_reason() -> str | None:
    """Why this machine builds pure Python whatever mypyc could do, or None (setup.py too)."""
    if os.environ.get("MQTT_AFFINITY_PURE", "") not in ("", "0"):
        return "MQTT_AFFINITY_PURE is set"
    include = sysconfig.get_path("include")
    if not Path(include, "Python.h").is_file():
        return f"no Python.h in {include} (Debian: apt-get install python3-dev)"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    return None


def get_requires_for_build_wheel(config_settings: dict[str, str | list[str]] | None = None) -> list[str]:
    requires = list(_setuptools.get_requires_for_build_wheel(config_settings))
    if pure_reason() is None:
        requires.append(MYPYC_REQUIREMENT)
    return requires
