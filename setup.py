"""Build script: everything is in pyproject.toml except the optional mypyc compilation.

A wheel build (``pip install .``, ``pip wheel .``) compiles the modules of one decision's hot
path (``COMPILED``) with mypyc and the machine's C compiler. Their Python source goes into the
wheel as well, and the package behaves the same without the compiled modules: every reason not
to compile gives a pure-Python install with a message (pip shows it with ``-v``), never a
failed one:

* ``MQTT_AFFINITY_PURE=1`` in the environment;
* an editable install (``pip install -e .``, the dev virtualenv): the suite tests the source;
* no ``Python.h`` (Debian: ``apt-get install python3-dev``) or no C compiler;
* mypyc (the ``mypy`` package, a build requirement that ``build_backend.py`` adds unless one
  of the reasons above holds) missing;
* mypyc or the compiler failing: then none of the compiled modules is installed.

``mqtt-affinity --version`` says which build is installed. The figures that justify compiling
are in the README (Performance) and come from ``bench/compiled_hot_path.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The in-tree backend (pyproject's backend-path) knows when this machine cannot compile; it is
# next to this file, which setuptools runs from the project's root.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_backend import pure_reason

#: The pure modules (no I/O) of the per-decision path: SPOP codec, HRW, CONNECT fields, rules.
#: bench/compiled_hot_path.py and tests/test_compiled.py build the same list.
COMPILED = [
    "agent/spop/errors.py",
    "agent/spop/types.py",
    "agent/spop/events.py",
    "agent/spop/frames.py",
    "agent/spop/connection.py",
    "agent/placement.py",
    "agent/request.py",
    "agent/rules.py",
]
#: setup.py commands that build extension modules (egg_info, dist_info and sdist, which
#: setuptools also runs for a wheel, never do; editable_wheel never compiles).
_BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def _say(message: str) -> None:
    print(f"mqtt-affinity: {message}", file=sys.stderr, flush=True)


def _pure_reason() -> str | None:
    """Why this build is pure Python, or None when it may compile."""
    if "editable_wheel" in sys.argv or "develop" in sys.argv:
        return "editable install (the source is what runs)"
    reason = pure_reason()
    if reason is not None:
        return reason
    try:
        import mypyc.build  # noqa: F401
    except ImportError as exc:
        return f"mypyc cannot be imported ({exc})"
    return None


def _ext_modules() -> list[Any]:
    if not _BUILDING.intersection(sys.argv[1:]) and "editable_wheel" not in sys.argv:
        return []
    reason = _pure_reason()
    if reason is None:
        from mypyc.build import mypycify

        try:
            # Generates C under build/ (mypy type-checks the modules with pyproject's settings).
            modules: list[Any] = mypycify(COMPILED, group_name="mqtt_affinity")
        except (Exception, SystemExit) as exc:  # mypyc exits on a type error
            reason = f"mypyc failed ({exc!r})"
        else:
            _say(f"compiling {len(COMPILED)} modules with mypyc (MQTT_AFFINITY_PURE=1 for pure Python)")
            return modules
    _say(f"building pure Python: {reason}")
    return []


class OptionalBuildExt(build_ext):
    """Compiles all of ``COMPILED`` or none: a compiler error removes what was built and the
    install goes on in pure Python (a lone compiled module could not import its group's shared
    library)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            for path in self.get_outputs():
                Path(path).unlink(missing_ok=True)
            _say(f"building pure Python: compiling failed ({exc})")


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
