"""`studio-engine postmortem`'s text report (the `--json` form is `Report.to_json`, the page
is engine.cli.report)."""

from __future__ import annotations

from engine.core.postmortem import PHASES, Report
from engine.core.timeline import clock, row, seconds


def _args(args: list[str] | None, inherit: str = "inherit") -> str:
    if args is None:
        return inherit
    return " ".join(args) if args else "(none)"


def render(report: Report, journal: str, tail_lines: int = 10) -> str:
    """The human-readable postmortem (the `--json` form is `Report.to_json`)."""
    out = [
        f"postmortem of slot {report.slot!r} in {journal}: {report.events} events, "
        f"final state {report.final_state!r}",
        "",
        f"LOADS ({len(report.loads)})",
    ]
    header = f"  {'seq':>6}  {'requested (UTC)':23}  {'load':12}  {'outcome':28} {'total':>8}  "
    header += "  ".join(f"{phase:>7}" for phase in PHASES)
    out.append(header)
    for load in report.loads:
        phases = "  ".join(f"{seconds(load.phases.get(p)):>7}" for p in PHASES)
        out.append(
            f"  {load.seq:>6}  {clock(load.requested_at):23}  {load.load_id:12}  "
            f"{load.outcome[:28]:28} {seconds(load.total_s):>8}  {phases}"
        )
        settings = " ".join(f"{k}={v}" for k, v in load.settings.items() if v not in (None, False))
        out.append(f"          model {load.model}" + (f"  [{settings}]" if settings else ""))
        in_force = _args(load.extra_args, "(not spawned)")
        out.append(
            f"          extra args: requested {_args(load.requested_extra_args)}; "
            f"in force {in_force}"
        )
        if load.reload_reason:
            out.append(f"          reloaded because: {load.reload_reason}")
        if load.planned is not None:
            plan = load.planned
            gpus = ",".join(map(str, plan["gpus"])) or "-"
            unified = " kv-unified" if plan["kv_unified"] else ""
            out.append(
                f"          planned: context {plan['context']} (ceiling {plan['max_context']}, "
                f"native {plan['native_context']}), {plan['parallel_slots']} slots{unified}, "
                f"GPUs {gpus}, offload {plan['offload']}: {plan['reason']}"
            )
        if load.effective is not None:
            effective = load.effective
            out.append(
                "          effective: "
                + (
                    f"n_ctx {effective.get('n_ctx')}, {effective.get('total_slots')} slots"
                    if "error" not in effective
                    else effective["error"]
                )
                + " (GET /props)"
            )
        for step, rung in enumerate(load.rungs, 1):
            out.append(f"          ladder rung {step}: {rung}")
        if load.fallback_reason:
            out.append(f"          gave up: {load.fallback_reason}")
        if load.error:
            kind = f" [{load.failure_kind}]" if load.failure_kind else ""
            out.append(f"          error{kind}: {load.error}")
    out += ["", f"INCIDENTS ({len(report.incidents)})"]
    for incident in report.incidents:
        kind = f" [{incident.failure_kind}]" if incident.failure_kind else ""
        out.append(
            f"  #{incident.seq} {clock(incident.at)} {incident.kind} "
            f"(load {incident.load_id or '-'}){kind}: {incident.error}"
        )
        if incident.log_tail:
            lines = incident.log_tail.splitlines()[-tail_lines:]
            out.append(f"      log tail (last {len(lines)} lines):")
            out.extend(f"      | {line}" for line in lines)
    out += ["", f"RECOVERIES ({len(report.recoveries)})"]
    for recovery in report.recoveries:
        orphans = ", ".join(map(str, recovery.orphans_killed)) or "none"
        adopted = recovery.adopted_pid if recovery.adopted_pid is not None else "none"
        out.append(
            f"  #{recovery.seq} {clock(recovery.at)} from {recovery.previous_state!r}: "
            f"adopted {adopted}, orphans killed {orphans}; {recovery.summary or 'unfinished'}"
        )
    out += ["", f"RESPAWNS AND IDLE UNLOADS ({len(report.restarts)})"]
    for restart in report.restarts:
        out.append(f"  #{restart.seq} {clock(restart.at)} {restart.kind}: {restart.detail}")
    out += ["", f"ANOMALIES ({len(report.anomalies)})"]
    for anomaly in report.anomalies:
        flag = "VIOLATION " if anomaly.violation else ""
        out.append(f"  #{anomaly.seq} {clock(anomaly.at)} {flag}{anomaly.kind}: {anomaly.message}")
    out += ["", "TIMELINE"]
    previous = None
    for line in report.timeline:
        out.append("  " + row(line.seq, line.at, previous, line.event, line.state))
        previous = line.at
    return "\n".join(out) + "\n"
