"""What an agent crash and an agent restart cost, per HAProxy configuration and version.

Each run builds its own stack on 127.0.0.1 (devstack): Redis, three mosquitto brokers, two
agents and two HAProxy balancers, each balancer asking its own agent first. An open-loop
load (devstack.scenario.OpenLoopLoad) sends persistent CONNECTs at --rate per second over
--ids client ids, every id alternating balancers. During the load one agent (ha1's) is:

  kill:  SIGKILLed at 3 s and started again 7 s later;
  term:  sent SIGTERM at 3 s, and started again as soon as it has exited (a restart);
  stop:  sent SIGSTOP at 3 s (a wedged agent: connections accepted, nothing answered) and
         SIGCONT 7 s later;
  steady: nothing (the cost of the configuration when all is well).

Afterwards every CONNECT is joined with its HAProxy log line and its id's Redis record
(devstack.scenario.analyse): connects without CONNACK, SPOE errors, calls that waited
`timeout processing`, connects routed without an agent decision, connects off their
record, ids split between brokers.

The configurations compared are the shipped haproxy/haproxy.cfg + spoe-mqtt.conf
(`shipped`) and variants built from it by replacing its `backend be_spoa` section and
its agent-call rules (see VARIANTS below).

    .venv/bin/python bench/agent_failover.py                                  # shipped, both versions
    .venv/bin/python bench/agent_failover.py --variants single,backup,shipped --scenarios kill,term
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devstack import HAPROXY_CFG, SPOE_CONF, Stack  # noqa: E402
from devstack.scenario import OpenLoopLoad, Report, analyse, run_scenario  # noqa: E402

SPOA_MODE = """\
.if version_atleast(3.1)
    mode spop
.else
    mode tcp
.endif
    option spop-check
"""

ONE_CALL = "    tcp-request content send-spoe-group mqtt-router grp-route if { nbsrv(be_spoa) gt 0 }\n"
RETRY_CALL = ONE_CALL + """\
    tcp-request content set-var(txn.spoe_err1) var(txn.mqtt.err) if { var(txn.mqtt.err) -m found }
    tcp-request content unset-var(txn.mqtt.err) if { var(txn.spoe_err1) -m found }
    tcp-request content send-spoe-group mqtt-router grp-route if { var(txn.spoe_err1) -m found } { nbsrv(be_spoa) gt 0 }
"""

RETRY2_CALL = RETRY_CALL + """\
    tcp-request content set-var(txn.spoe_err2) var(txn.mqtt.err) if { var(txn.mqtt.err) -m found }
    tcp-request content unset-var(txn.mqtt.err) if { var(txn.spoe_err2) -m found }
    tcp-request content send-spoe-group mqtt-router grp-route if { var(txn.spoe_err2) -m found } { nbsrv(be_spoa) gt 0 }
"""


@dataclass
class Variant:
    name: str
    doc: str
    be_spoa: str | None = None  # the whole `backend be_spoa` section; None = as shipped
    calls: str | None = None  # the agent-call rules of fe_mqtt; None = as shipped
    continue_on_error: bool | None = None  # spoe-mqtt.conf `option continue-on-error`; None = as shipped
    agent: dict[str, object] = field(default_factory=dict)  # agent YAML overrides
    subst: tuple[tuple[str, str], ...] = ()  # text replacements in haproxy.cfg, after the above


def _be(servers: str, extra: str = "", connect: str = "1s") -> str:
    return f"backend be_spoa\n{SPOA_MODE}    timeout connect {connect}\n    timeout server 1m\n{extra}{servers}"


CHK = "check inter 1s fall 2 rise 2"
OBS = "observe layer4 error-limit 1 on-error mark-down"
REDISPATCH = "    retries 1\n    option redispatch 1\n"
NO_DRAIN = {"drain_period": 0}


def _servers(opts: str = "", peer: str = "backup") -> str:
    """The two agent servers: this balancer's own, then the peer's (``peer``: backup or a weight)."""
    own = "weight 100" if peer == "weight 1" else ""
    return (f'    server spoa1 "${{SPOA_ADDR}}" {" ".join(x for x in (CHK, opts, own) if x)}\n'
            f'    server spoa2 "${{SPOA_PEER_ADDR}}" {" ".join(x for x in (CHK, opts, peer) if x)}\n')


BACKUP_OBS = _servers(OBS)
WEIGHTS_OBS = _servers(OBS, peer="weight 1")

VARIANTS = {v.name: v for v in [
    Variant("single", "one agent per balancer (main before this work)",
            _be(f'    server spoa1 "${{SPOA_ADDR}}" {CHK}\n'), ONE_CALL, False, NO_DRAIN),
    Variant("backup", "+ the peer's agent as backup", _be(_servers()), ONE_CALL, False, NO_DRAIN),
    Variant("backup+observe", "+ observe layer4 mark-down, retries 1 + redispatch",
            _be(BACKUP_OBS, REDISPATCH), ONE_CALL, False, NO_DRAIN),
    Variant("backup+observe+conn100", "as backup+observe, timeout connect 100ms",
            _be(BACKUP_OBS, REDISPATCH, connect="100ms"), ONE_CALL, False, NO_DRAIN),
    Variant("backup+observe+retry", "as backup+observe+conn100, + a second agent call after an SPOE error",
            _be(BACKUP_OBS, REDISPATCH, connect="100ms"), RETRY_CALL, True, NO_DRAIN),
    Variant("retries0+retry", "backup + observe, retries 0, a second agent call after an SPOE error",
            _be(BACKUP_OBS, "    retries 0\n"), RETRY_CALL, True, NO_DRAIN),
    Variant("weights+retry", "as backup+observe+retry with weights 100/1 instead of backup",
            _be(WEIGHTS_OBS, REDISPATCH, connect="100ms"), RETRY_CALL, True, NO_DRAIN),
    Variant("backup+observe+retry2", "as backup+observe+retry, up to two more agent calls",
            _be(BACKUP_OBS, REDISPATCH, connect="100ms"), RETRY2_CALL, True, NO_DRAIN),
    Variant("weights+retry2", "as weights+retry, up to two more agent calls",
            _be(WEIGHTS_OBS, REDISPATCH, connect="100ms"), RETRY2_CALL, True, NO_DRAIN),
    Variant("retries0+retry2", "as backup+observe+retry2 with retries 0 (timeout connect 1s): shipped, "
            "except that both calls asked again go through be_spoa (own agent first)",
            _be(BACKUP_OBS, "    retries 0\n"), RETRY2_CALL, True, NO_DRAIN),
    Variant("shipped", "haproxy/haproxy.cfg and spoe-mqtt.conf as they are (retries0+retry2, the first call "
            "asked again through be_spoa_peer: peer agent first, also after a timeout; timeout check 250ms), "
            "agents' default drain_period",
            agent={"drain_period": None}),
    Variant("shipped-weights", "shipped, with the peer agent as a second active server (weights 100/1), not backup",
            agent={"drain_period": None},
            subst=(('    server spoa1 "${SPOA_ADDR-127.0.0.1:12345}"\n',
                    '    server spoa1 "${SPOA_ADDR-127.0.0.1:12345}" weight 100\n'),
                   ('    server spoa2 "${SPOA_PEER_ADDR}" backup\n',
                    '    server spoa2 "${SPOA_PEER_ADDR}" weight 1\n'))),
]}


def build_configs(variant: Variant, workdir: Path) -> tuple[Path, Path]:
    cfg = HAPROXY_CFG.read_text()
    spoe = SPOE_CONF.read_text()
    if variant.be_spoa is not None:
        # The variants predate the second engine (mqtt-router-peer, backend be_spoa_peer).
        head, sep, _ = cfg.partition("\nbackend be_spoa\n")
        assert sep, "haproxy.cfg has no be_spoa section"
        cfg = head + "\n" + variant.be_spoa
        cfg = "".join(line for line in cfg.splitlines(keepends=True) if "engine mqtt-router-peer" not in line)
    if variant.calls is not None:
        lines = cfg.splitlines(keepends=True)
        calls = [i for i, line in enumerate(lines) if "send-spoe-group" in line or "txn.spoe_err" in line]
        assert calls, "haproxy.cfg has no send-spoe-group rule"
        lines[calls[0]:calls[-1] + 1] = [variant.calls]
        cfg = "".join(lines)
    if variant.continue_on_error is not None:
        spoe = "\n".join(line for line in spoe.splitlines() if "option continue-on-error" not in line) + "\n"
        if variant.continue_on_error:
            spoe = spoe.replace("    option var-prefix mqtt\n",
                                "    option var-prefix mqtt\n    option continue-on-error\n")
    for old, new in variant.subst:
        assert old in cfg, f"{variant.name}: {old!r} is not in haproxy.cfg"
        cfg = cfg.replace(old, new)
    if "err1=" not in cfg:
        cfg = cfg.replace("ptime=%[var(txn.mqtt.ptime)]",
                          "ptime=%[var(txn.mqtt.ptime)] err1=%[var(txn.spoe_err1)] err2=%[var(txn.spoe_err2)]")
    else:
        cfg = cfg.replace("var(txn.err1)", "var(txn.spoe_err1)").replace("var(txn.err2)", "var(txn.spoe_err2)")
    cfg_path, spoe_path = workdir / f"haproxy-{variant.name}.cfg", workdir / f"spoe-{variant.name}.conf"
    cfg_path.write_text(cfg)
    spoe_path.write_text(spoe)
    return cfg_path, spoe_path


def run_one(version: str, variant: Variant, scenario: str, *, rate: float, ids: int, workdir: Path,
            log: Callable[[str], None]) -> tuple[Report, list[tuple[float, str]]]:
    cfg_path, spoe_path = build_configs(variant, workdir)
    with Stack(version, workdir=workdir / "stack", die_with_parent=True) as stack:
        stack.start_redis()
        stack.start_brokers()
        a1 = stack.start_agent("ha1", overrides=variant.agent)
        a2 = stack.start_agent("ha2", overrides=variant.agent)
        env = {"SPOE_CONF": str(spoe_path)}
        stack.start_balancer("ha1", agents=[a1, a2], cfg_path=cfg_path, env=env)
        stack.start_balancer("ha2", agents=[a2, a1], cfg_path=cfg_path, env=env)
        stack.wait_ready()
        ports = [b.port for b in stack.balancers]
        pool = [f"fo-{scenario}-{i:04d}" for i in range(ids)]

        def restart() -> None:
            a1.start()
            a1.wait_listening()

        if scenario == "kill":
            load = OpenLoopLoad(ports, pool, rate=rate, duration=15.0)
            actions = [(3.0, "SIGKILL agent ha1", a1.kill), (10.0, "start agent ha1", restart)]
        elif scenario == "stop":
            load = OpenLoopLoad(ports, pool, rate=rate, duration=15.0)
            actions = [(3.0, "SIGSTOP agent ha1", lambda: a1.send_signal(signal.SIGSTOP)),
                       (10.0, "SIGCONT agent ha1", lambda: a1.send_signal(signal.SIGCONT))]
        elif scenario == "steady":
            load = OpenLoopLoad(ports, pool, rate=rate, duration=12.0)
            actions = []
        elif scenario == "term":
            load = OpenLoopLoad(ports, pool, rate=rate, duration=12.0)
            actions = [(3.0, "SIGTERM agent ha1 and start it again",
                        lambda: (a1.stop(timeout=30), restart()))]
        else:
            raise ValueError(scenario)
        timeline = run_scenario(load, actions)
        report = analyse(load.attempts, [b.haproxy for b in stack.balancers], stack.owners)
        report.generator_lag_ms = load.max_lag * 1000
        for b in stack.balancers:
            # 3.1+: one stream per agent call, so stot counts the calls each agent got; 2.6: connections.
            stot = {r["svname"]: r["stot"] for r in b.haproxy.stats() if r["pxname"] == "be_spoa"
                    and r["svname"] not in ("FRONTEND", "BACKEND")}
            log(f"  {b.name} be_spoa sessions per agent server: {stot}")
        log(f"  timeline: {timeline.events}; generator lag {load.max_lag * 1000:.0f} ms")
        for kind, rows in report.examples.items():
            log(f"  e.g. {kind}: {rows[:2]}")
        return report, timeline.events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haproxy", default="both", choices=["2.6", "3.2", "both"])
    ap.add_argument("--variants", default="shipped", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--scenarios", default="kill,term")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--ids", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--drain", type=float, help="the agents' drain_period (default: the variant's)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    versions = ["2.6", "3.2"] if args.haproxy == "both" else [args.haproxy]
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    if args.drain is not None:
        variants = [dataclasses.replace(v, name=f"{v.name} drain={args.drain:g}",
                                        agent={**v.agent, "drain_period": args.drain}) for v in variants]
    scenarios = args.scenarios.split(",")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows = []
    for variant in variants:
        for scenario in scenarios:
            for version in versions:
                for rep in range(args.repeat):
                    with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
                        log(f"{variant.name} / {scenario} / HAProxy {version} / run {rep + 1}")
                        t = time.monotonic()
                        report, events = run_one(version, variant, scenario, rate=args.rate, ids=args.ids,
                                                 workdir=Path(tmp), log=log)
                        log(f"  {report.summary()} ({time.monotonic() - t:.0f}s)")
                        for f in report.failures:
                            log(f"  WARNING: {f}")
                        rows.append({"variant": variant.name, "scenario": scenario, "haproxy": version,
                                     "run": rep + 1, **report.row(), "error_codes": report.error_codes,
                                     "events": events})
    cols = ["connects", "no_connack", "spoe_errors", "first_errors", "waited", "no_decision", "off_record",
            "split_ids", "fallbacks", "p99_ms", "max_ms"]
    print(f"| config | scenario | HAProxy | {' | '.join(cols)} |")
    print("|---|---|---|" + "---:|" * len(cols))
    for r in rows:
        vals = [f"{r[c]:.0f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {r['variant']} | {r['scenario']} | {r['haproxy']} | {' | '.join(vals)} |")
    print(f"\n{platform.node()}: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("command: .venv/bin/python bench/agent_failover.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
