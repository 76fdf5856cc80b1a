"""`studio-engine` (also `python -m engine`): replay, postmortem, diagram, verify, demo, db."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from engine.adapters.binary import ServerBinaryError
from engine.adapters.journal import Journal
from engine.cli.timeline import parse_until, print_timeline, read_steps, tail
from engine.core.errors import CorruptJournal, EngineError, JournalError
from engine.core.events import Event, is_slot_stream
from engine.core.node_events import NodeEvent
from engine.core.node_report import NodeReport
from engine.core.snapshot import SnapshotError
from engine.core.snapshot import decode as decode_snapshot
from engine.core.state import SlotState
from engine.replay import Step, replay_steps


def cmd_replay(args: argparse.Namespace) -> int:
    if args.json:
        steps = read_steps(args.journal, args.slot, parse_until(args.until))
        for step in steps:
            print(
                json.dumps(
                    {
                        "seq": step.seq,
                        "at": step.at,
                        "state": step.state.state,
                        "event": step.event.model_dump(mode="json"),
                    }
                )
            )
        return 0
    print_timeline(args.journal, args.slot, parse_until(args.until))
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    if args.lines < 0:
        raise argparse.ArgumentTypeError(f"--lines must be >= 0, not {args.lines}")
    tail(args.journal, slot=args.slot, lines=args.lines, follow=args.follow, as_json=args.json)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from engine.metrics import JournalMetrics

    journal = Journal.open(args.journal, create=False, read_only=True)
    try:
        sys.stdout.write(JournalMetrics(journal).render().decode())
    finally:
        journal.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.catalog import build_catalog
    from engine.core.rules import InvalidRequest
    from engine.node import Node
    from engine.service import NodeBackend, create_app, is_loopback

    key = os.environ.get("STUDIO_ENGINE_CONTROL_KEY")
    if args.control_key_file:
        key = Path(args.control_key_file).read_text().strip()
    if not is_loopback(args.host) and not key:
        raise argparse.ArgumentTypeError(
            f"--host {args.host} is reachable from other machines: set a control key "
            "(--control-key-file FILE or $STUDIO_ENGINE_CONTROL_KEY)"
        )
    try:
        catalog = build_catalog(
            Path(args.preset) if args.preset else None,
            Path(args.models_dir) if args.models_dir else None,
        )
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if args.max_servers is not None and args.max_servers < 1:
        raise argparse.ArgumentTypeError(f"--max-servers must be >= 1, not {args.max_servers}")
    node = Node.open(
        args.journal, llama_server=args.llama_server, max_servers=args.max_servers, restore=True
    )
    backend = NodeBackend(node, catalog)
    try:
        app = create_app(backend, control_key=key or None)
        print(f"studio-engine: serving {len(catalog)} model(s) on http://{args.host}:{args.port}")
        sys.stdout.flush()
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the previous handler:
        # make that a clean exit, so the engine below still stops its servers.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # Event streams never end on their own: give them 5 s, then close them.
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5
        )
    finally:
        backend.close()
    return 0


def cmd_diagram(args: argparse.Namespace) -> int:
    from engine.cli.diagram import mermaid, write_diagrams

    if args.journal:
        from engine.cli.report import transition_counts

        steps = read_steps(args.journal, args.slot, None)
        text = mermaid(counts=transition_counts((s.event.type, s.state.state) for s in steps))
    else:
        text = mermaid()
    if args.stdout:
        print(text, end="")
        return 0
    for path in write_diagrams(Path(args.out), text):
        print(f"wrote {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Replay every slot and check the contract's invariants; 1 on a violation."""
    from engine.core.postmortem import analyse

    journal = Journal.open(args.journal, create=False, read_only=True)
    problems: list[str] = []
    try:
        streams = [s for s in journal.streams() if is_slot_stream(s)]  # not @hub-probes
        node = _node_report(journal)
        if node.events:
            problems += [f"@node: event #{a.seq}: {a.kind}: {a.message}" for a in node.violations]
            print(
                f"node: {node.events} events, {len(node.evictions)} evictions, "
                f"{len(node.violations)} violations"
            )
        for stream in streams:
            snapshots = {version: text for version, _, _, text in journal.snapshots(stream)}
            report = analyse(_checked_records(journal, stream, snapshots, problems), stream)
            for version in snapshots:  # snapshots of versions the journal does not have
                problems.append(f"slot {stream!r}: snapshot at version {version} has no event")
            problems += [
                f"slot {stream!r}: event #{a.seq}: {a.kind}: {a.message}" for a in report.violations
            ]
            print(
                f"slot {stream!r}: {report.events} events, final state {report.final_state!r}, "
                f"{len(report.anomalies)} anomalies, {len(report.violations)} violations"
            )
    finally:
        journal.close()
    if problems:
        for problem in problems:
            print(f"VIOLATION {problem}")
        print(f"FAILED: {len(problems)} violation(s)")
        return 1
    print(f"ok: {len(streams)} slot(s) replay cleanly and keep every invariant")
    return 0


def _checked_records(
    journal: Journal, stream: str, snapshots: dict[int, str], problems: list[str]
) -> Iterator[tuple[int, Event, SlotState]]:
    """The stream's (seq, event, state after); each snapshot met on the way is compared with
    the replay (and removed from `snapshots`)."""
    for step in replay_steps(journal.read_rows(stream)):
        text = snapshots.pop(step.state.version, None)
        if text is not None:
            _check_snapshot(stream, step, text, problems)
        yield step.seq, step.event, step.state


def _check_snapshot(stream: str, step: Step, text: str, problems: list[str]) -> None:
    try:
        stored = decode_snapshot(text)
    except SnapshotError as exc:  # unreadable: the engine ignores it and replays (a warning only)
        print(f"warning: slot {stream!r}: snapshot at version {step.state.version}: {exc}")
        return
    if stored != step.state:
        problems.append(
            f"slot {stream!r}: snapshot at version {step.state.version} differs from replay"
        )


def _node_report(journal: Journal) -> NodeReport:
    """The @node stream analysed (empty without a Node); a garbage row names its seq."""
    from engine.core.errors import CorruptJournal
    from engine.core.node_events import NODE_STREAM, parse_node_event
    from engine.core.node_report import analyse_node

    def records() -> Iterator[tuple[int, NodeEvent]]:
        for seq, _version, _at, type_, payload in journal.read_rows(NODE_STREAM):
            try:
                yield seq, parse_node_event(payload)
            except ValueError as exc:
                raise CorruptJournal(seq, f"unreadable {type_!r} node event: {exc}") from exc

    return analyse_node(records())


def _window(text: str | None) -> int | float | None:
    """A --since/--until bound: a sequence number, or an ISO time as epoch seconds."""
    bound = parse_until(text, "--since or --until")
    return bound.timestamp() if isinstance(bound, datetime) else bound


def cmd_postmortem(args: argparse.Namespace) -> int:
    from engine.cli.postmortem_text import render
    from engine.core.postmortem import analyse

    if args.health_wait <= 0:
        raise argparse.ArgumentTypeError(f"--health-wait must be positive, not {args.health_wait}")
    since, until = _window(args.since), _window(args.until)
    journal = Journal.open(args.journal, create=False, read_only=True)
    try:
        node = _node_report(journal)
    finally:
        journal.close()
    if args.slot == "@node":  # the node: every eviction and why, refusals
        if args.json:
            print(json.dumps(node.to_json(), indent=2))
        else:
            from engine.core.node_report import render_node

            print(render_node(node, args.journal), end="")
        return 0
    steps = read_steps(args.journal, args.slot, None)
    report = analyse(
        ((step.seq, step.event, step.state) for step in steps),
        args.slot,
        health_wait_s=args.health_wait,
        since=since,
        until=until,
    )
    if args.html:
        from engine.cli.report import render_html, transition_counts

        counts = transition_counts((step.event.type, step.state.state) for step in steps)
        Path(args.html).write_text(render_html(report, args.journal, counts))
        print(f"wrote {args.html}")
    elif args.json:
        evictions = [asdict(e) for e in node.evictions_of(args.slot)]
        print(json.dumps({**report.to_json(), "evictions": evictions}, indent=2))
    else:
        print(render(report, args.journal), end="")
        if node.evictions_of(args.slot):  # why was this slot's server evicted
            from engine.core.node_report import render_evictions

            print("\n" + render_evictions(node, args.slot), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.cli.demo import run_demo, run_hub_demo

    if args.hub is not None:
        return run_hub_demo(Path(args.dir), args.hub, args.variant)
    return run_demo(Path(args.dir))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    journal = Journal.open(args.journal)
    try:
        print(f"{journal.url}: schema at revision {journal.schema_revision()}")
    finally:
        journal.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="studio-engine",
        description="Lifecycle engine for llama-server: journal replay, diagrams and a demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    replay = sub.add_parser("replay", help="print a slot's timeline replayed from the journal")
    replay.add_argument("journal", help="journal file path or SQLAlchemy URL")
    replay.add_argument("--slot", default="default")
    replay.add_argument(
        "--until", help="stop after this sequence number or ISO time (UTC unless it says)"
    )
    replay.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    replay.set_defaults(func=cmd_replay)

    tail = sub.add_parser("tail", help="print the newest events; -f: as they are appended")
    tail.add_argument("journal", help="journal file path or SQLAlchemy URL")
    tail.add_argument("-f", "--follow", action="store_true", help="wait for new events")
    tail.add_argument("--slot", help="only this slot (default: every stream)")
    tail.add_argument("-n", "--lines", type=int, default=10, help="events to show first")
    tail.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    tail.set_defaults(func=cmd_tail)

    metrics = sub.add_parser("metrics", help="the journal's Prometheus metrics, once")
    metrics.add_argument("journal", help="journal file path or SQLAlchemy URL")
    metrics.set_defaults(func=cmd_metrics)

    serve = sub.add_parser(
        "serve", help="HTTP: llama.cpp router-compatible /models, OpenAI /v1/*, /metrics, SSE"
    )
    serve.add_argument("journal", help="journal file path or SQLAlchemy URL")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--models-dir", help="offer every .gguf file in this folder")
    serve.add_argument("--preset", help="TOML (or .ini) file of named load requests")
    serve.add_argument("--control-key-file", help="file holding the key clients must send")
    serve.add_argument("--llama-server", help="the llama-server binary (default: found)")
    serve.add_argument(
        "--max-servers", type=int, help="at most this many servers at once (default: by memory)"
    )
    serve.set_defaults(func=cmd_serve)

    diagram = sub.add_parser("diagram", help="write the machine as Mermaid (.mmd and .md)")
    diagram.add_argument("--out", default="diagrams", help="output folder (default: diagrams/)")
    diagram.add_argument("--journal", help="draw only the transitions this journal took")
    diagram.add_argument("--slot", default="default")
    diagram.add_argument("--stdout", action="store_true", help="print instead of writing files")
    diagram.set_defaults(func=cmd_diagram)

    verify = sub.add_parser(
        "verify", help="replay every slot, check the invariants; exit 1 on a violation"
    )
    verify.add_argument("journal")
    verify.set_defaults(func=cmd_verify)

    postmortem = sub.add_parser(
        "postmortem",
        help="phases, failures, recoveries and anomalies of a slot's history "
        "(--slot @node: the node's evictions and why)",
    )
    postmortem.add_argument("journal", help="journal file path or SQLAlchemy URL")
    postmortem.add_argument("--slot", default="default")
    postmortem.add_argument(
        "--since", help="from this sequence number or ISO time (UTC unless it says)"
    )
    postmortem.add_argument(
        "--until", help="up to this sequence number or ISO time (UTC unless it says)"
    )
    postmortem.add_argument(
        "--health-wait",
        type=float,
        default=60.0,
        help="flag health waits longer than this many seconds (default: 60)",
    )
    output = postmortem.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON document for tools")
    output.add_argument(
        "--html", metavar="FILE", help="write a self-contained page: Gantt, incidents, machine"
    )
    postmortem.set_defaults(func=cmd_postmortem)

    demo = sub.add_parser("demo", help="walk a real session against a real llama-server")
    demo.add_argument("--dir", default="var/demo", help="where the journal, model and logs go")
    demo.add_argument(
        "--hub",
        metavar="OWNER/REPO",
        help="instead: download a hub GGUF repo with a progress bar (honours HF_ENDPOINT, "
        "HF_TOKEN, HF_HUB_OFFLINE), load it twice, unload",
    )
    demo.add_argument("--variant", help="with --hub: the GGUF variant, e.g. Q4_K_M")
    demo.set_defaults(func=cmd_demo)

    db = sub.add_parser("db", help="journal schema management")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="upgrade a journal's schema to this engine's head")
    upgrade.add_argument("journal")
    upgrade.set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CorruptJournal as exc:
        print(f"studio-engine: error: {exc.naming(args.journal)}", file=sys.stderr)
        return 2
    except (DBAPIError, UnicodeError) as exc:  # a damaged file met where no guard expected it
        where = getattr(args, "journal", None) or "journal"
        cause = str(getattr(exc, "orig", exc)).strip().splitlines()[:1] or [type(exc).__name__]
        print(f"studio-engine: error: {where}: unreadable journal ({cause[0]})", file=sys.stderr)
        return 2
    except (JournalError, EngineError, ServerBinaryError, argparse.ArgumentTypeError) as exc:
        # One line, whatever the journal holds: a reader wants the file and the event #seq.
        message = " ".join(str(exc).split())
        print(f"studio-engine: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `studio-engine replay J | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
