"""The per-decision pure-Python hot path, pure against compiled with mypyc, in one run.

What is timed (CPU per operation, ``time.process_time``), on the objects the agent uses:

  decode   ``SpopConnection.receive_data`` of one NOTIFY frame carrying one ``mqtt-connect``
           message as HAProxy sends it (bench/codec_micro.py's frame)
  parse    ``agent.request.parse_connect`` of its arguments, and ``.persistent``
  elig     ``agent.rules.eligibility`` over 3 nodes (in the agent: once per change of
           config, health or overrides, not per decision; timed for completeness)
  hrw      ``agent.placement.choose`` over the 3 nodes (a new 24-byte id each call)
  encode   ``SpopConnection.send`` of the ACK (``node`` + ``how`` set-vars)
  chain    decode + parse + hrw + encode, one decision's worth (no elig)

How: the project is copied into a temporary folder and setup.py builds its compiled modules
there in place (``COMPILED``: the SPOP codec, placement, request, rules; the ``mypy`` of this
virtualenv, the machine's C compiler; ~30 s), so the source tree never gets a ``.so``. Then this
script runs itself once per variant, alternating, in a child process whose ``sys.path`` starts
with either the repository (pure) or that folder (compiled); each child checks which kind of
module it imported. The best of ``--repeat`` runs per variant is kept.

    .venv/bin/python bench/compiled_hot_path.py                 # build, 0.3 s per case, 5 runs each
    .venv/bin/python bench/compiled_hot_path.py --build-dir /tmp/mc --repeat 9

``--build-dir`` keeps (and reuses) the compiled copy. Nothing asserts: timings depend on the
machine; the ratio is what to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: What setup.py needs of the project to build.
PROJECT_FILES = ("pyproject.toml", "setup.py", "build_backend.py", "MANIFEST.in", "README.md")
CASES = ("decode", "parse", "elig", "hrw", "encode", "chain")


def build(dest: Path) -> Path:
    """Copy the project into ``dest`` and build setup.py's compiled modules there in place."""
    if any((dest / "agent").glob("placement.*.so")):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "agent", dest / "agent", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "MQTT_AFFINITY_PURE"}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--parallel", "2"],
                          cwd=dest, env=env, capture_output=True, text=True, check=False)
    said = [line for line in proc.stderr.splitlines() if line.startswith("mqtt-affinity:")]
    if proc.returncode != 0 or not any((dest / "agent").glob("placement.*.so")):
        sys.exit(f"no compiled build ({proc.returncode}): {said}\n{proc.stderr[-4000:]}")
    print(f"built in {time.monotonic() - started:.1f} s into {dest}: {' '.join(said)}", file=sys.stderr)
    return dest


@dataclass(frozen=True)
class _Node:
    name: str
    weight: float


def _measure(fn: Callable[[], object], seconds: float) -> float:
    """CPU microseconds per call of ``fn``, in batches to keep the clock out."""
    batch = 2000
    calls = 0
    start = time.process_time()
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        used = time.process_time() - start
        if used >= seconds:
            return used * 1e6 / calls


def child(variant: str, seconds: float) -> None:
    from ipaddress import IPv4Address

    import agent.placement as placement
    from agent.request import parse_connect
    from agent.rules import NodeOverrides, eligibility
    from agent.spop import Ack, AgentHello, Message, Notify, Scope, SetVar, SpopConnection
    from agent.spop.frames import encode_haproxy_hello, encode_notify

    compiled = placement.__file__ is not None and placement.__file__.endswith(".so")
    if compiled != (variant == "compiled"):
        sys.exit(f"{variant}: imported {placement.__file__}")

    message = Message("mqtt-connect", (
        ("client_id", b"sensor-0042-4f1c9a7be3d2"),
        ("src", IPv4Address("10.1.2.3")),
        ("username", b"device-user"),
        ("proto_ver", b"4"),
        ("flags", b"0"),
        ("sess_expiry", None),
        ("balancer", "lb-eu-1"),
    ))
    notify = encode_notify(1234, 1, [message])
    conn = SpopConnection()
    conn.receive_data(encode_haproxy_hello("2.0", 16380, "pipelining"))
    conn.send(AgentHello())
    nodes = (_Node("node1", 1.0), _Node("node2", 1.0), _Node("node3", 2.0))
    healthy = frozenset(n.name for n in nodes)
    overrides = NodeOverrides()
    elig = eligibility(nodes, healthy, overrides, 100)
    placeable = elig.placeable
    actions = (SetVar(Scope.TRANSACTION, "node", "node2"), SetVar(Scope.TRANSACTION, "how", "hit"))
    ids = [b"sensor-%016d" % i for i in range(4096)]
    counter = [0]

    def next_id() -> bytes:
        counter[0] = (counter[0] + 1) & 4095
        return ids[counter[0]]

    def chain() -> None:
        for ev in conn.receive_data(notify):
            assert isinstance(ev, Notify)
            req = parse_connect(ev.messages[0].args)
            _ = req.persistent
            node = placement.choose(next_id(), placeable)
            assert node is not None
            conn.send(Ack(ev.stream_id, ev.frame_id, actions))

    cases: dict[str, Callable[[], object]] = {
        "decode": lambda: conn.receive_data(notify),
        "parse": lambda: parse_connect(message.args).persistent,
        "elig": lambda: eligibility(nodes, healthy, overrides, 100),
        "hrw": lambda: placement.choose(next_id(), placeable),
        "encode": lambda: conn.send(Ack(1234, 1, actions)),
        "chain": chain,
    }
    print(json.dumps({name: _measure(fn, seconds) for name, fn in cases.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="CPU seconds per case (default 0.3)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant, alternating, best kept (default 5)")
    parser.add_argument("--build-dir", type=Path, help="keep/reuse the compiled copy here")
    parser.add_argument("--variant", choices=("pure", "compiled"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args.variant, args.seconds)
        return

    with tempfile.TemporaryDirectory(prefix="mqtt-affinity-mypyc-") as tmp:
        built = build(args.build_dir.resolve() if args.build_dir else Path(tmp))
        best: dict[str, dict[str, float]] = {"pure": {}, "compiled": {}}
        for _ in range(args.repeat):
            for variant, root in (("pure", REPO), ("compiled", built)):
                env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
                out = subprocess.run([sys.executable, "-P", __file__, "--variant", variant,
                                      "--seconds", str(args.seconds)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                for case, us in json.loads(out).items():
                    best[variant][case] = min(us, best[variant].get(case, us))

    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<8}{'pure us/op':>12}{'compiled us/op':>16}{'compiled/pure':>15}")
    for case in CASES:
        pure, comp = best["pure"][case], best["compiled"][case]
        print(f"{case:<8}{pure:>12.2f}{comp:>16.2f}{comp / pure:>15.2f}")


if __name__ == "__main__":
    main()
