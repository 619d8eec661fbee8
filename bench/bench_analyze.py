#!/usr/bin/env python3
"""Time `kaobs analyze` against tshark's keepalive filter on the same large capture.

Issue 2's target: on a capture of at least a million packets of Postgres-like
traffic with keepalive flows mixed in, kaobs at least 10x faster than
``tshark -r FILE -Y tcp.analysis.keep_alive``, peak memory under 150 MB
whatever the file size, and the same probes found.

Both tools run as subprocesses in the same run, alternately, several times
(best and median wall time; peak RSS from ``os.wait4``), so that a busy
machine slows both alike. The probe sets are then compared with each other and
with the generator's truth file (`make_capture.py`): kaobs's keepalive probes
must be tshark's keep_alive frames minus the zero-window probes (tshark 4.0
labels those Keep-Alive too; docs/kernel-keepalive.md), and kaobs's window probes must be
exactly the zero-window probes. A second, larger capture (default 5M packets)
is analysed by kaobs alone, to show that its memory stays flat.

Usage:
    python3 bench/bench_analyze.py                     # 1M packets, 3 runs each, then 5M for memory
    python3 bench/bench_analyze.py --packets 200000 --big-packets 0 --repeat 1   # a quick look
    git worktree add /tmp/kaobs-old v-old && python3 bench/bench_analyze.py --baseline /tmp/kaobs-old
        # also time another checkout of kaobs in the same run: a before/after comparison

Exit status 0 when every target is met, 1 when one is not, 2 when a tool fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_capture import GENERATOR_VERSION, generate  # noqa: E402

TARGET_SPEEDUP = 10.0
TARGET_PEAK_MB = 150.0


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # wall clock
    cpu: list[float] = field(default_factory=list)  # user + system, less sensitive to a busy machine
    peak_mb: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def peak(self) -> float:
        return max(self.peak_mb)


def capture(directory: str, packets: int, seed: int, snaplen: int, reuse: bool) -> tuple[str, dict]:
    """The capture of `packets` packets and its truth, generated unless a matching one exists."""
    path = os.path.join(directory, f"kaobs-bench-{packets}-s{seed}.pcap")
    truth_path = path + ".truth.json"
    if reuse and os.path.exists(path) and os.path.exists(truth_path):
        with open(truth_path) as f:
            truth = json.load(f)
        if (truth.get("generator") == GENERATOR_VERSION and truth.get("packets") == packets
                and truth.get("seed") == seed and truth.get("snaplen") == snaplen):
            print(f"reusing {path}", file=sys.stderr)
            return path, truth
    print(f"generating {path} ({packets} packets)...", file=sys.stderr)
    started = time.perf_counter()
    truth = generate(path, packets, seed, snaplen)
    with open(truth_path, "w") as f:
        json.dump(truth, f)
    print(f"  done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path, truth


def run_timed(argv: list[str], stdout_path: str, cwd: str | None = None) -> tuple[float, float, float, int]:
    """Run a command with stdout to a file: (wall seconds, CPU seconds, peak RSS in MB, exit code)."""
    with open(stdout_path, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, cwd=cwd)
        # stderr is small (warnings); read it before waiting so the child never blocks.
        err = process.stderr.read() if process.stderr else b""
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.stderr:
        process.stderr.close()
    code = process.returncode
    if code not in (0, 1):
        sys.stderr.write(err.decode(errors="replace"))
    cpu = usage.ru_utime + usage.ru_stime
    return elapsed, cpu, usage.ru_maxrss / 1024.0, code  # ru_maxrss is in KiB on Linux


def kaobs_argv(path: str, console_script: bool) -> list[str]:
    if console_script:
        exe = shutil.which("kaobs")
        if exe is None:
            raise SystemExit("bench: the kaobs console script is not on PATH (pip install -e .)")
        return [exe, "analyze", path, "--format", "json"]
    return [sys.executable, "-m", "kaobs", "analyze", path, "--format", "json"]


def tshark_argv(path: str) -> list[str]:
    return ["tshark", "-r", path, "-Y", "tcp.analysis.keep_alive", "-T", "fields", "-e", "frame.number"]


def kaobs_probes(json_path: str) -> tuple[set[int], set[int], dict[int, bool | None]]:
    """(keepalive probe frames, zero-window probe frames, answered per keepalive frame)."""
    with open(json_path) as f:
        document = json.load(f)
    keepalive: set[int] = set()
    window: set[int] = set()
    answered: dict[int, bool | None] = {}
    for conn in document["connections"]:
        for side in conn["sides"].values():
            for probe in side["probes"]:
                if probe["kind"] == "keepalive":
                    keepalive.add(probe["frame"])
                    answered[probe["frame"]] = probe["answered"]
                else:
                    window.add(probe["frame"])
    return keepalive, window, answered


def tshark_frames(path: str) -> set[int]:
    with open(path) as f:
        return {int(line) for line in f if line.strip()}


def describe(name: str, got: set[int], want: set[int]) -> str:
    if got == want:
        return f"{name}: equal ({len(got)})"
    extra, missing = sorted(got - want), sorted(want - got)
    return f"{name}: DIFFER, {len(extra)} extra {extra[:8]}, {len(missing)} missing {missing[:8]}"


def compare(truth: dict, kaobs_json: str, tshark_out: str | None) -> tuple[bool, list[str], dict]:
    truth_keepalive = {p["frame"] for p in truth["keepalive_probes"]}
    truth_answered = {p["frame"]: p["answered"] for p in truth["keepalive_probes"]}
    truth_window = set(truth["zero_window_probes"])
    keepalive, window, answered = kaobs_probes(kaobs_json)
    lines = [
        describe("kaobs keepalive probes vs truth", keepalive, truth_keepalive),
        describe("kaobs zero-window probes vs truth", window, truth_window),
    ]
    ok = keepalive == truth_keepalive and window == truth_window
    # Informational, not part of "the same probes": whether kaobs says each
    # probe was answered (an answer seen on the wire can be judged lost).
    wrong_answers = sorted(f for f in truth_answered if answered.get(f) != truth_answered[f])
    lines.append("(info) kaobs answered/unanswered vs truth: "
                 + ("equal" if not wrong_answers else f"differ at {len(wrong_answers)} probes {wrong_answers[:8]}"))
    counts = {"truth_keepalive": len(truth_keepalive), "truth_window": len(truth_window),
              "kaobs_keepalive": len(keepalive), "kaobs_window": len(window),
              "answered_differ": wrong_answers}
    if tshark_out is not None:
        tshark = tshark_frames(tshark_out)
        counts["tshark_keep_alive"] = len(tshark)
        lines.append(describe("kaobs keepalive vs tshark keep_alive minus zero-window probes",
                              keepalive, tshark - truth_window))
        lines.append(describe("tshark keep_alive vs truth keepalive + zero-window", tshark,
                              truth_keepalive | truth_window))
        ok = ok and keepalive == tshark - truth_window and tshark == truth_keepalive | truth_window
    return ok, lines, counts


def measure(path: str, repeat: int, with_tshark: bool, console_script: bool,
            workdir: str, baseline: str | None = None) -> tuple[Timing, Timing | None, str, str | None, Timing | None]:
    """Alternate kaobs, the baseline checkout (if any) and tshark runs; keep the last outputs for the comparison."""
    kaobs_out = os.path.join(workdir, "kaobs.json")
    tshark_out = os.path.join(workdir, "tshark.txt") if with_tshark else None
    kaobs, tshark = Timing(), (Timing() if with_tshark else None)
    before = Timing() if baseline else None
    for i in range(repeat):
        seconds, cpu, peak, code = run_timed(kaobs_argv(path, console_script), kaobs_out)
        if code not in (0, 1):
            raise SystemExit(f"bench: kaobs analyze failed with exit code {code}")
        kaobs.seconds.append(seconds)
        kaobs.cpu.append(cpu)
        kaobs.peak_mb.append(peak)
        line = f"  run {i + 1}/{repeat}: kaobs {seconds:.2f} s (cpu {cpu:.2f} s) {peak:.0f} MB"
        if before is not None:
            baseline_out = os.path.join(workdir, "baseline.json")
            seconds, cpu, peak, code = run_timed(kaobs_argv(path, False), baseline_out, cwd=baseline)
            if code not in (0, 1):
                raise SystemExit(f"bench: the baseline's kaobs analyze failed with exit code {code}")
            before.seconds.append(seconds)
            before.cpu.append(cpu)
            before.peak_mb.append(peak)
            line += f", baseline {seconds:.2f} s (cpu {cpu:.2f} s) {peak:.0f} MB"
        if tshark is not None and tshark_out is not None:
            seconds, cpu, peak, code = run_timed(tshark_argv(path), tshark_out)
            if code != 0:
                raise SystemExit(f"bench: tshark failed with exit code {code}")
            tshark.seconds.append(seconds)
            tshark.cpu.append(cpu)
            tshark.peak_mb.append(peak)
            line += f", tshark {seconds:.2f} s (cpu {cpu:.2f} s) {peak:.0f} MB"
        print(line + f"  (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return kaobs, tshark, kaobs_out, tshark_out, before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000, help="packets of the timed capture")
    parser.add_argument("--big-packets", type=int, default=5_000_000,
                        help="packets of the capture kaobs alone reads for the memory check (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--snaplen", type=int, default=128)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "kaobs-bench"),
                        help="where captures are written and reused")
    parser.add_argument("--fresh", action="store_true", help="regenerate captures even if present")
    parser.add_argument("--console-script", action="store_true",
                        help="run the `kaobs` console script instead of `python3 -m kaobs`")
    parser.add_argument("--pcapng", action="store_true",
                        help="also time both tools on the capture converted to pcapng (editcap)")
    parser.add_argument("--json-out", help="also write the figures as JSON to this file")
    parser.add_argument("--baseline", metavar="DIR",
                        help="another checkout of kaobs (e.g. a git worktree of an older commit), timed on the "
                             "same capture in the same run, alternately: a before/after comparison")
    args = parser.parse_args(argv)
    if args.packets < 1 or args.repeat < 1:
        parser.error("--packets and --repeat must be positive")
    have_tshark = shutil.which("tshark") is not None
    if not have_tshark:
        print("bench: tshark is not installed: timing kaobs alone", file=sys.stderr)
    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="kaobs-bench-out-")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if have_tshark:
        results["machine"]["tshark"] = subprocess.run(
            ["tshark", "--version"], capture_output=True, text=True).stdout.splitlines()[0]

    path, truth = capture(args.dir, args.packets, args.seed, args.snaplen, not args.fresh)
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "kaobs", "__main__.py")):
        parser.error(f"--baseline {args.baseline}: not a kaobs checkout (no kaobs/__main__.py)")
    kaobs, tshark, kaobs_out, tshark_out, before = measure(path, args.repeat, have_tshark, args.console_script,
                                                          workdir, args.baseline)
    agree, lines, counts = compare(truth, kaobs_out, tshark_out)
    for line in lines:
        print(line)
    if before is not None:
        same = _same_output(kaobs_out, os.path.join(workdir, "baseline.json"))
        print(f"this checkout against the baseline {args.baseline}: median wall {kaobs.median:.2f} s vs "
              f"{before.median:.2f} s ({before.median / kaobs.median:.2f}x), median CPU {kaobs.cpu_median:.2f} s vs "
              f"{before.cpu_median:.2f} s ({before.cpu_median / kaobs.cpu_median:.2f}x), peak {kaobs.peak:.0f} MB vs "
              f"{before.peak:.0f} MB; reports {'byte-identical' if same else 'DIFFER'}")
        results["baseline"] = {"dir": args.baseline, "median_s": before.median, "cpu_median_s": before.cpu_median,
                               "peak_mb": before.peak, "wall_s": before.seconds, "cpu_s": before.cpu,
                               "speedup_median": before.median / kaobs.median, "same_report": same}
    rows = [_row(path, truth, kaobs, tshark, counts, agree)]
    results["timed"] = rows[0]

    if args.pcapng:
        ng_path = os.path.splitext(path)[0] + ".pcapng"
        if not os.path.exists(ng_path) or os.path.getmtime(ng_path) < os.path.getmtime(path):
            subprocess.run(["editcap", "-F", "pcapng", path, ng_path], check=True)
        ng_kaobs, ng_tshark, ng_out, ng_tshark_out, _ = measure(
            ng_path, args.repeat, have_tshark, args.console_script, workdir)
        ng_agree, ng_lines, ng_counts = compare(truth, ng_out, ng_tshark_out)
        for line in ng_lines:
            print(f"[pcapng] {line}")
        rows.append(_row(ng_path, truth, ng_kaobs, ng_tshark, ng_counts, ng_agree))
        results["pcapng"] = rows[-1]
        agree = agree and ng_agree

    big_ok = True
    if args.big_packets:
        big_path, big_truth = capture(args.dir, args.big_packets, args.seed, args.snaplen, not args.fresh)
        big_kaobs, _, big_out, _, _ = measure(big_path, 1, False, args.console_script, workdir)
        big_agree, big_lines, big_counts = compare(big_truth, big_out, None)
        for line in big_lines:
            print(f"[{args.big_packets} packets] {line}")
        rows.append(_row(big_path, big_truth, big_kaobs, None, big_counts, big_agree))
        results["memory"] = rows[-1]
        big_ok = big_agree and big_kaobs.peak < TARGET_PEAK_MB

    print()
    print(markdown(rows))
    speed_ok = tshark is None or tshark.median / kaobs.median >= TARGET_SPEEDUP
    memory_ok = kaobs.peak < TARGET_PEAK_MB and big_ok
    print()
    print(f"targets: speed >= {TARGET_SPEEDUP:g}x: {'met' if speed_ok else 'NOT met'}; "
          f"peak < {TARGET_PEAK_MB:g} MB: {'met' if memory_ok else 'NOT met'}; "
          f"same probes: {'yes' if agree else 'NO'}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if speed_ok and memory_ok and agree else 1


def _same_output(a: str, b: str) -> bool:
    with open(a, "rb") as first, open(b, "rb") as second:
        return first.read() == second.read()


def _row(path: str, truth: dict, kaobs: Timing, tshark: Timing | None, counts: dict, agree: bool) -> dict:
    row = {
        "file": os.path.basename(path),
        "packets": truth["packets"],
        "file_mb": os.path.getsize(path) / 1e6,
        "runs": len(kaobs.seconds),
        "kaobs_best_s": kaobs.best, "kaobs_median_s": kaobs.median, "kaobs_cpu_median_s": kaobs.cpu_median,
        "kaobs_peak_mb": kaobs.peak, "kaobs_wall_s": kaobs.seconds, "kaobs_cpu_s": kaobs.cpu,
        "probes": counts,
        "agree": agree,
    }
    if tshark is not None:
        row.update({"tshark_best_s": tshark.best, "tshark_median_s": tshark.median,
                    "tshark_cpu_median_s": tshark.cpu_median, "tshark_peak_mb": tshark.peak,
                    "tshark_wall_s": tshark.seconds, "tshark_cpu_s": tshark.cpu,
                    "speedup_median": tshark.median / kaobs.median, "speedup_best": tshark.best / kaobs.best,
                    "speedup_cpu": tshark.cpu_median / kaobs.cpu_median})
    return row


def markdown(rows: list[dict]) -> str:
    out = ["| packets | file | tshark s (best / median) | tshark peak | kaobs s (best / median) | kaobs peak "
           "| speed-up (median wall / CPU) | keepalive probes: truth / tshark* / kaobs "
           "| zero-window probes: truth / kaobs | agreement |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        p = r["probes"]
        if "tshark_best_s" in r:
            tshark = f"{r['tshark_best_s']:.2f} / {r['tshark_median_s']:.2f}"
            tshark_mb = f"{r['tshark_peak_mb']:.0f} MB"
            ratio = f"{r['speedup_median']:.1f}x / {r['speedup_cpu']:.1f}x"
            tshark_probes = str(p["tshark_keep_alive"] - p["truth_window"])
        else:
            tshark = tshark_mb = ratio = tshark_probes = "-"
        out.append(
            f"| {r['packets']:,} | {r['file_mb']:.0f} MB {r['file'].rsplit('.', 1)[-1]} | {tshark} | {tshark_mb} "
            f"| {r['kaobs_best_s']:.2f} / {r['kaobs_median_s']:.2f} | {r['kaobs_peak_mb']:.0f} MB | {ratio} "
            f"| {p['truth_keepalive']} / {tshark_probes} / {p['kaobs_keepalive']} "
            f"| {p['truth_window']} / {p['kaobs_window']} | {'same probes' if r['agree'] else 'DIFFER'} |")
    out.append("")
    out.append("\\* tshark's `tcp.analysis.keep_alive` frames minus the zero-window probes, which it labels "
               "Keep-Alive too.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
