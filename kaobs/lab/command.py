"""`kaobs lab`: the seed's experiment, end to end, in about 20 seconds.

Postgres starts in Docker as the seed ran it (``postgres
--tcp_keepalives_idle=3 --tcp_keepalives_interval=2
--tcp_keepalives_count=3``), a persistent psycopg client connects from a
container of its own and goes idle, the server's probes are answered twice,
then the client vanishes (its packets are dropped) and the server probes,
gives up and resets, all shown live by the same pipeline as `kaobs watch`,
then judged against the lab's own settings, and everything the lab created
is removed. Options change the settings, the client, the fault and the
image; `--expect` and friends replace the lab's expectations (a deliberately
wrong one must end with exit 1).
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Sequence

import click

from analysis.expect import Expectations, build_expectations
from analysis.model import Connection
from analysis.path import PathSummary
from analysis.pipeline import AnalysisRun, tally
from analysis.settings import LIBPQ_KEYWORDS, ExpectationError
from analysis.verdict import ConnectionReport, judge_connection
from kaobs.lab.docker import (
    DEFAULT_IMAGE,
    IMAGE_ENV,
    LOCAL_IMAGE,
    check_docker,
    check_image,
    check_tools,
    default_image,
)
from kaobs.lab.plan import expected_end
from kaobs.lab.run import LabEvent, LabRun
from kaobs.lab.scenario import (
    FAULT_CLIENT_RETURNS,
    FAULT_CLIENT_VANISHES,
    FAULT_MIDDLEBOX_DROP,
    FAULT_MIDDLEBOX_RESET,
    FAULT_NONE,
    FAULT_STOPS_READING,
    LAB_FAULTS,
    LabError,
    Scenario,
    client_conninfo_params,
    expect_items,
    scenario_from_options,
    server_command,
    sysctl_items,
    vanishing_side,
)
from kaobs.mermaid import write_mermaid
from kaobs.options import (FiniteFloatRange, Output, UserError, expectation_options, idle_cut_option, make_output,
                           metrics_options, output_options, stdout_closed, write_html_file, write_mode_option)
from kaobs.report import TextOptions, echo_json, error_console, render_text, text_console, to_json
from kaobs.status import exit_status
from kaobs.watch import run_live
from sniffer.records import CaptureError


def lab_expectations(lab: LabRun, client_endpoint: str, user: tuple[Sequence[str], str | None, Sequence[str]]) -> Expectations:
    """The lab's expectation for one connection; the user's --expect/--client-dsn/--sysctl replace its own.

    --expect replaces the server side, --client-dsn the client side, --sysctl
    the kernel defaults measured in the containers (for the lab's own
    settings too). The side that vanished stays unjudged unless the user
    gave an expectation for it.
    """
    own = lab.expectations_for(client_endpoint)
    expect, client_dsn, sysctls = user
    if not expect and client_dsn is None and not sysctls:
        return own
    defaults = list(sysctls) or sysctl_items(lab.env.server_sysctls, lab.env.client_sysctls)
    session = lab.scenario.sessions[lab.sessions_by_port.get(client_endpoint, 0)]
    gone = vanishing_side(lab.scenario.fault)
    try:
        if expect:
            server = build_expectations(expect, None, defaults).server
        elif sysctls and gone != "server":
            server = build_expectations(expect_items(lab.scenario, session), None, defaults).server
        else:
            server = own.server
        if client_dsn is not None:
            client = build_expectations((), client_dsn, defaults).client
        elif sysctls and gone != "client":
            client = build_expectations((), client_conninfo_params(lab.scenario), defaults).client
        else:
            client = own.client
    except ExpectationError as error:
        raise LabError(str(error)) from None
    return Expectations(server, client)


def live_expectations(lab: LabRun, user) -> Callable[[Connection], Expectations]:
    """Each connection's own expectation while the lab runs, as `rejudge` will judge it at the end.

    A connection's session is known once the client said which port it
    connected from; until then the first session's expectation stands in, and
    the connection is looked up again. Cached per client endpoint.
    """
    cache: dict[str, tuple[bool, Expectations]] = {}

    def of(conn: Connection) -> Expectations:
        endpoint = conn.client.endpoint
        known = endpoint in lab.sessions_by_port
        hit = cache.get(endpoint)
        if hit is None or hit[0] != known:
            hit = cache[endpoint] = (known, lab_expectations(lab, endpoint, user))
        return hit[1]

    return of


def rejudge(lab: LabRun, run: AnalysisRun, reports: list[ConnectionReport], user, hz: int) -> list[ConnectionReport]:
    """Judge each connection against its own session's expectation (sessions can differ)."""
    end = run.capture_end if run.capture_end is not None else 0.0
    path = PathSummary()  # what the capture shows of the path, as the first judging saw it
    for report in reports:
        path.add(report.connection, report.path_cut)
    out = []
    for report in reports:
        conn = report.connection
        exp = lab_expectations(lab, conn.client.endpoint, user)
        server = exp.server if exp.server.judged() else None
        client = exp.client if exp.client.judged() else None
        forgets = path.forgets_after(conn.client.address, conn.server.address)
        out.append(judge_connection(conn, server, client, end, hz, lab.scenario.idle_cut, forgets))
    return out


def lab_json(lab: LabRun, image: str) -> dict:
    """What the lab did, for the JSON report's "lab" key (no password anywhere)."""
    scenario = lab.scenario
    return {
        "image": image,
        "run_id": lab.env.run_id,
        "network": lab.env.network,
        "bridge": lab.env.bridge,
        "server": {"container": lab.env.server.name if lab.env.server else None,
                   "address": lab.env.server.ip if lab.env.server else None,
                   "command": server_command(scenario),
                   "sysctls": lab.env.server_sysctls},
        "client": {"container": lab.env.client.name if lab.env.client else None,
                   "address": lab.env.client.ip if lab.env.client else None,
                   "libpq": dict(scenario.client_params),
                   "sysctls": lab.env.client_sysctls},
        "sessions": [
            {"index": i, "options": [list(o) for o in s.options], "sets": [list(o) for o in s.sets],
             "stop_reading": s.stop_reading,
             "client": next((port for port, index in lab.sessions_by_port.items() if index == i), None),
             "shown": lab.session_settings.get(i)}
            for i, s in enumerate(scenario.sessions)
        ],
        "fault": {"kind": scenario.fault, "t": lab.fault_t, "method": lab.env.fault_method or None,
                  "after_answered": scenario.fault_after_answered},
        "ready_t": lab.ready_t,
        "end_reason": lab.end_reason,
        "time_bound": lab.bound,
        "events": [{"t": e.t, "kind": e.kind, "message": e.message} for e in lab.events],
    }


@click.command(short_help="Run the keepalive experiment live in Docker, then clean up.")
@click.option("--image", default=None, show_default=f"${IMAGE_ENV}, else {DEFAULT_IMAGE}, else {LOCAL_IMAGE} when only it is here",
              help="Postgres image (official interface); never pulled. CI uses kaobs/postgres:15-local.")
@click.option("--tcp-keepalives-idle", "idle", default=None, metavar="VALUE",
              help="Server GUC tcp_keepalives_idle (Postgres units; 0 = kernel default). Default 3, or 1.5 x "
                   "--idle-cut with a middlebox fault (probes that come too late).")
@click.option("--tcp-keepalives-interval", "interval", default=None, metavar="VALUE",
              help="Server GUC tcp_keepalives_interval (Postgres units; 0 = kernel default). Default 2, or 1 with a "
                   "middlebox fault.")
@click.option("--tcp-keepalives-count", "count", default=None, metavar="VALUE",
              help="Server GUC tcp_keepalives_count (0 = kernel default). Default 3.")
@click.option("--tcp-user-timeout", "user_timeout", default=None, metavar="VALUE", help="Server GUC tcp_user_timeout (ms).")
@click.option("-c", "settings", multiple=True, metavar="NAME=VALUE", help="Any server setting, as postgres -c. Repeatable.")
@click.option("--server-sysctl", multiple=True, metavar="NAME=N",
              help="Kernel default in the server's namespace: docker run --sysctl net.ipv4.tcp_keepalive_time=N (also _intvl, _probes).")
@click.option("--client-sysctl", multiple=True, metavar="NAME=N", help="The same for the client's namespace.")
@click.option("--libpq", multiple=True, metavar="KEY=VALUE",
              help=f"Client libpq parameter: {', '.join(LIBPQ_KEYWORDS)}.")
@click.option("--session", "sessions", multiple=True, metavar="SPEC",
              help="One client connection each (default: one): 'default', or 'set:NAME=V,options:NAME=V' per-session "
                   "settings, 'every:S' (query every S s), 'query-after:S' (query once, after S s).")
@click.option("--fault", type=click.Choice(LAB_FAULTS), default=FAULT_CLIENT_VANISHES, show_default=True,
              help="client-vanishes / server-vanishes: every packet of that side dropped (no FIN, no RST); "
                   "client-stops-reading: a large result never read (zero-window probes); middlebox-drop / "
                   "middlebox-reset: a router between client and server forgets connections idle --idle-cut seconds, "
                   "then drops their packets or answers them with a RST; client-returns: the client vanishes, "
                   "comes back after the server's abort and closes its sessions; none.")
@click.option("--answered", type=click.IntRange(0, 100), default=2, show_default=True,
              help="The fault comes after this many answered probes of the side that must notice it.")
@click.option("--fault-after", type=FiniteFloatRange(0, 600), default=None, metavar="S",
              help="Bound on that wait: the fault comes S seconds after the client went idle at the latest.")
@click.option("--duration", type=FiniteFloatRange(1, 600), default=None, metavar="S",
              help="Stop S seconds after the client went idle at the latest (default: from the settings).")
@click.option("--write", "-w", "write_path", metavar="FILE.pcap", type=click.Path(dir_okay=False),
              help="Keep the capture: headers only unless --full-packets.")
@click.option("--full-packets", is_flag=True, help="With --write, keep whole packets.")
@write_mode_option
@expectation_options
@idle_cut_option
@metrics_options
@output_options
def lab(image, idle, interval, count, user_timeout, settings, server_sysctl, client_sysctl, libpq, sessions, fault,
        answered, fault_after, duration, write_path, full_packets, write_mode, expect, client_dsn, sysctls, ports, hz,
        output_format, idle_cut=None, only=(), summary=False, show_all=False, quiet=False, color="auto",
        connection=None, html=None, metrics_address=None, metrics_linger=0.0) -> None:
    """Run the seed's experiment live in Docker: probes, fault, abort, verdict; then clean up.

    Needs root and a Docker engine. The report is judged against the
    lab's own settings unless --expect/--client-dsn/--sysctl say
    otherwise. Exit 0 when nothing contradicts them, 1 when something
    does, 2 when the lab cannot run.
    """
    output = make_output(output_format, only, summary, show_all, quiet, color, connection, html)
    if full_packets and not write_path:
        raise UserError("--full-packets only makes sense with --write FILE.pcap")
    if len(ports) > 1:
        raise UserError("kaobs lab runs one server: give --port once")
    try:
        scenario = scenario_from_options(
            idle=idle, interval=interval, count=count, user_timeout=user_timeout, settings=settings,
            server_sysctls=server_sysctl, client_sysctls=client_sysctl, libpq=libpq, sessions=sessions,
            fault=fault, answered=answered, fault_after=fault_after, duration=duration, port=ports[0],
            idle_cut=idle_cut)
        user = (tuple(expect), client_dsn, tuple(sysctls))
        build_expectations(expect, client_dsn, sysctls)  # bad --expect: one line now, not after the run
        check_docker()
        check_tools()
        image = image or default_image()
        check_image(image)
    except (LabError, ExpectationError) as error:
        raise UserError(str(error)) from None
    served = None
    if metrics_address is not None:  # listening before any container starts: a port in use is said at once
        from kaobs.metrics import MetricsError, metrics_say, start_metrics

        try:
            served = (*start_metrics(metrics_address, None, metrics_say(quiet, metrics_address)), metrics_linger)
        except MetricsError as error:
            raise UserError(str(error)) from None
        click.get_current_context().call_on_close(served[1].close)
    sys.exit(run_lab(scenario, image, user=user, hz=int(hz), output_format=output_format, write_path=write_path,
                     full_packets=full_packets, fault_label=fault, output=output, write_mode=write_mode,
                     metrics=served))


def run_lab(scenario: Scenario, image: str, *, user, hz: int, output_format: str, write_path: str | None,
            full_packets: bool, fault_label: str, output: Output | None = None, write_mode: int = 0o600,
            metrics=None) -> int:
    """Set up, run live, judge, print, clean up. Returns the exit status; raises UserError when the lab fails.

    `metrics` (--metrics): the run's `WatchMetrics`, its listening `MetricsServer` and the linger in seconds.
    """
    output = output or Output(TextOptions())
    output.check_html()
    console = text_console(output.color)
    err = error_console(output.color)
    text = output_format == "text"
    show = console if text else err

    def on_event(event: LabEvent) -> None:
        if output.quiet and event.kind != "error":
            return
        style = {"fault": "bold magenta", "error": "bold red", "setup": "dim"}.get(event.kind, "cyan")
        show.print(f"lab: {event.message}", style=style, markup=False, highlight=False)

    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    lab = LabRun(scenario, image, write=write_path, full_packets=full_packets, on_event=on_event, write_mode=write_mode)
    gone = vanishing_side(scenario.fault)
    cut = f"{scenario.idle_cut:g}" if scenario.idle_cut is not None else "?"
    plan = {FAULT_NONE: "no fault", FAULT_STOPS_READING: "the client stops reading a large result",
            FAULT_MIDDLEBOX_DROP: f"a router forgets connections idle {cut} s and drops their packets "
                                  "(capturing on the server's side)",
            FAULT_MIDDLEBOX_RESET: f"a router forgets connections idle {cut} s and answers their "
                                   "packets with a RST (capturing on the server's side)",
            FAULT_CLIENT_RETURNS: f"the client vanishes after {scenario.fault_after_answered} answered probe(s) and "
                                  "comes back after the server's abort"}.get(
        fault_label, f"the {gone} vanishes after {scenario.fault_after_answered} answered probe(s)")
    end = expected_end(scenario)
    say = (lambda *args, **kwargs: None) if output.quiet else show.print  # the plan is not the report
    say(f"kaobs lab: {image}, {len(scenario.sessions)} session(s), {plan}; "
        + (f"expected to end ~{end:.0f} s after the client goes idle" if end and end <= lab.bound
           else f"runs up to {lab.bound:.0f} s"),
        style="bold", markup=False, highlight=False)
    if end and end > lab.bound:
        say(f"lab: these settings end the connection only after ~{end:.0f} s (kernel defaults?); the lab stops "
            f"after {lab.bound:.0f} s: set the timers in seconds, or --server-sysctl/--client-sysctl",
            style="yellow", markup=False, highlight=False)
    interrupted = False
    result: tuple[AnalysisRun, list[ConnectionReport]] | None = None
    try:
        try:
            lab.__enter__()
            watch_metrics = metrics[0] if metrics is not None else None
            if watch_metrics is not None:
                watch_metrics.set_expectations(lab_expectations(lab, "", user))
            with lab.capture() as capture:
                lab.start()
                run, reports = run_live(
                    capture, expectations=lab.default_expectations(), ports=[scenario.port], hz=hz,
                    output_format=output_format, duration=lab.bound + 10, stop=lab.stop_event, console=console,
                    title=f"kaobs lab {lab.env.run_id}", idle_cut=scenario.idle_cut,
                    expectations_for=live_expectations(lab, user), quiet=output.quiet, err=err,
                    metrics=watch_metrics, on_judged=watch_metrics.on_judged if watch_metrics is not None else None)
            if lab.error:
                raise LabError(lab.error)
            result = run, rejudge(lab, run, reports, user, hz)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if in_main:  # the cleanup must finish: no second interrupt in the middle of docker rm
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            lab.close()
            if in_main:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    except (LabError, CaptureError) as error:
        raise UserError(str(error)) from None
    if interrupted or result is None:
        raise UserError("interrupted; everything the lab created was removed")
    run, reports = result
    expectations = lab_expectations(lab, reports[0].connection.client.endpoint, user) if reports else lab.default_expectations()
    try:
        _print_lab_report(console, err, lab, run, reports, expectations, image, output_format, user, gone, write_path,
                          full_packets, output)
    except BrokenPipeError:
        stdout_closed()  # `kaobs lab | head`: the lab ran all the same
    write_html_file(output, run, reports, expectations, f"kaobs lab {lab.env.run_id}: {plan}")
    if metrics is not None:
        from kaobs.metrics import end_metrics, metrics_say

        _, server, linger = metrics
        end_metrics(server, linger, metrics_say(output.quiet, server.address))
    return exit_status(tally(reports))


def _print_lab_report(console, err, lab: LabRun, run: AnalysisRun, reports: list[ConnectionReport],
                      expectations: Expectations, image: str, output_format: str, user, gone: str | None,
                      write_path: str | None, full_packets: bool, output: Output) -> None:
    if output_format == "json":
        document = to_json(run, reports, expectations)
        document["lab"] = lab_json(lab, image)
        echo_json(document)
    elif output_format == "mermaid":
        write_mermaid(sys.stdout, reports, output.text, source=f"kaobs lab {lab.env.run_id}")
    else:
        if not console.is_terminal and not output.quiet:
            console.print()
        render_text(console, run, reports, expectations, options=output.text)
        user_expect, user_client_dsn, _ = user
        if gone and not (user_client_dsn if gone == "client" else user_expect):
            console.print(f"the {gone}'s own keepalive settings are not judged: it vanished, so what its kernel "
                          "did after that never reached the wire", markup=False, highlight=False)
        if write_path:
            console.print(f"capture written to {write_path} ({'whole packets' if full_packets else 'headers only'})")
        if not output.quiet:
            err.print(f"lab: removed the containers and network of run {lab.env.run_id}", style="dim", highlight=False)
