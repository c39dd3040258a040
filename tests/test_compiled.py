"""The mypyc build of the hot modules (setup.py) against the pure source it is built from.

One build per run (about 30 s), the way a wheel build does it (``setup.py build_ext``: same
module list, same fallbacks), in a temporary copy of the project: the source tree never gets a
``.so`` (tests/conftest.py refuses to run with one there). Then:

* every module of setup.py's ``COMPILED`` is an extension module in that build;
* compiled ``choose``/``rank``/``score`` equal the pure ones on 20,000 ids and several node sets;
* the unit tests of the compiled modules pass against the build (a child pytest with
  ``MQTT_AFFINITY_COMPILED=DIR``, which tests/conftest.py puts first on ``sys.path``);
* a build that cannot compile installs pure Python and says why: ``MQTT_AFFINITY_PURE=1``, no C
  compiler, a compiler that fails.

Skipped, with the reason, only when this Python cannot compile at all (no ``Python.h`` or no C
compiler; Debian: ``apt-get install python3-dev gcc``). The rest of the suite tests the pure
source, which is what the dev virtualenv's editable install runs.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from agent import placement

REPO = Path(__file__).resolve().parents[1]
#: What the build needs of the project (as the Dockerfile copies it).
PROJECT_FILES = ("pyproject.toml", "setup.py", "build_backend.py", "MANIFEST.in", "README.md")
#: Unit tests (no processes) of the compiled modules, run against the build.
UNIT_TESTS = (
    "tests/test_spop_types.py",
    "tests/test_spop_frames.py",
    "tests/test_spop_connection.py",
    "tests/test_spop_fuzz.py",
    "tests/test_placement.py",
    "tests/test_request.py",
    "tests/test_affinity.py",
    "tests/test_cache.py",
    "tests/test_admin_explain.py",
)
NODE_SETS = (
    [("node1", 1.0), ("node2", 1.0), ("node3", 1.0)],
    [("node1", 1.0), ("node2", 2.5), ("node3", 0.0), ("node4", 0.25)],
    [(f"broker-{i:02d}", float(1 + i % 3)) for i in range(12)],
)
IDS = [b"client-%d" % i for i in range(20_000)] + [b"", b"\xff" * 300, "id-é".encode()]


def _compiled_list() -> list[str]:
    """setup.py's COMPILED, read without running setup.py."""
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no COMPILED list")


def _copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "agent", dest / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return dest


def _build_ext(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("MQTT_AFFINITY_PURE", "CC")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "--parallel", "2"],
        cwd=project, env=environ, capture_output=True, text=True, timeout=300, check=False,
    )


def _messages(proc: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("mqtt-affinity:"))


def _is_compiled(project: Path, module: str) -> bool:
    stem = project / module.removesuffix(".py")
    return any(Path(str(stem) + suffix).is_file() for suffix in EXTENSION_SUFFIXES)


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    project = _copy_project(tmp_path_factory.mktemp("compiled") / "project")
    proc = _build_ext(project)
    said = _messages(proc)
    if proc.returncode != 0:
        pytest.fail(f"setup.py build_ext failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if "no Python.h" in said or "no C compiler" in said:
        pytest.skip(f"this Python cannot compile extension modules: {said}")
    compiled = [m for m in _compiled_list() if _is_compiled(project, m)]
    assert compiled == _compiled_list(), f"{said}\n{proc.stderr[-3000:]}"
    assert f"compiling {len(compiled)} modules with mypyc" in said, said
    yield project


def test_every_listed_module_is_compiled(compiled_dir: Path) -> None:
    code = (
        "import importlib, json, sys\n"
        "mods = [m.removesuffix('.py').replace('/', '.') for m in json.loads(sys.argv[1])]\n"
        "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code, json.dumps(_compiled_list())],
        cwd=compiled_dir, env={**os.environ, "PYTHONPATH": str(compiled_dir)},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    files = json.loads(out)
    assert all(Path(f).is_relative_to(compiled_dir) and not f.endswith(".py") for f in files.values()), files
    # ... while this process runs the pure source.
    assert (placement.__file__ or "").endswith(".py")


def test_compiled_placement_equals_pure(compiled_dir: Path) -> None:
    code = (
        "import json, sys\n"
        "from agent import placement\n"
        "assert placement.__file__.endswith('.so'), placement.__file__\n"
        "node_sets, ids = json.loads(sys.stdin.read())\n"
        "ids = [bytes.fromhex(i) for i in ids]\n"
        "out = []\n"
        "for nodes in node_sets:\n"
        "    nodes = [tuple(n) for n in nodes]\n"
        "    out.append([placement.choose(k, nodes) for k in ids])\n"
        "    out.append([placement.rank(k, nodes) for k in ids[:2000]])\n"
        "    out.append([placement.score(k, n, w).hex() for k in ids[:500] for n, w in nodes])\n"
        "print(json.dumps(out))\n"
    )
    compiled = json.loads(subprocess.run(
        [sys.executable, "-P", "-c", code],
        input=json.dumps([NODE_SETS, [i.hex() for i in IDS]]),
        cwd=compiled_dir, env={**os.environ, "PYTHONPATH": str(compiled_dir)},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout)
    pure: list[object] = []
    for nodes in NODE_SETS:
        pure.append([placement.choose(k, nodes) for k in IDS])
        pure.append([placement.rank(k, nodes) for k in IDS[:2000]])
        pure.append([placement.score(k, n, w).hex() for k in IDS[:500] for n, w in nodes])
    assert len(compiled) == len(pure)
    for got, want in zip(compiled, pure):
        assert got == want


def test_unit_tests_pass_against_the_compiled_build(compiled_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not integration", *UNIT_TESTS],
        cwd=REPO, env={**os.environ, "MQTT_AFFINITY_COMPILED": str(compiled_dir)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert f"agent: compiled ({compiled_dir})" in proc.stdout  # the report header (conftest)


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"MQTT_AFFINITY_PURE": "1"}, "MQTT_AFFINITY_PURE is set"), ({"CC": "/nonexistent/cc"}, "no C compiler")],
)
def test_pure_fallback_says_why(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    project = _copy_project(tmp_path / "project")
    proc = _build_ext(project, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mqtt-affinity: building pure Python: {reason}" in _messages(proc)
    assert not [m for m in _compiled_list() if _is_compiled(project, m)]
    assert not list(project.glob("*.so"))


def test_failing_compiler_falls_back_to_pure(compiled_dir: Path, tmp_path: Path) -> None:
    project = _copy_project(tmp_path / "project")
    if (compiled_dir / ".mypy_cache").is_dir():  # mypy's work is done already: only the C fails
        shutil.copytree(compiled_dir / ".mypy_cache", project / ".mypy_cache")
    proc = _build_ext(project, CC="false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = _messages(proc)
    assert "building pure Python: compiling failed" in said, said + proc.stderr[-3000:]
    assert not [m for m in _compiled_list() if _is_compiled(project, m)]
    assert not list(project.glob("*.so"))


def test_no_python_h_means_pure_and_no_mypy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A fresh Debian without python3-dev: the backend does not even ask for mypy.
    import build_backend

    monkeypatch.delenv("MQTT_AFFINITY_PURE", raising=False)
    monkeypatch.setattr(build_backend.sysconfig, "get_path", lambda name: str(tmp_path))
    reason = build_backend.pure_reason()
    assert reason is not None and reason.startswith("no Python.h")
    monkeypatch.setattr(build_backend._setuptools, "get_requires_for_build_wheel", lambda cs=None: [])
    assert build_backend.get_requires_for_build_wheel() == []
    monkeypatch.undo()
    monkeypatch.setattr(build_backend._setuptools, "get_requires_for_build_wheel", lambda cs=None: [])
    monkeypatch.setenv("MQTT_AFFINITY_PURE", "1")
    assert build_backend.get_requires_for_build_wheel() == []
