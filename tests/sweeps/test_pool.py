"""The local launcher's worker processes stop cleanly: real launches of a two-worker sweep, each stopped by
a signal to its main process alone (`stopped_sweep` in conftest.py)."""
import json
import re
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
@pytest.mark.xdist_group("sweep_launches")
@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_sweep_stops_its_workers_and_starts_no_queued_point(stopped_sweep, signal_name, code):
    stop = stopped_sweep.stops[signal_name]
    assert stop.code == code and len(stop.running) == 2
    assert stop.left_alive == [], f"alive 10 s after {signal_name}: {stop.left_alive}"
    assert stop.started == stop.present, "a queued point started"
    # a running point can finish between the signal and its worker's stop: then it is neither stopped nor queued
    stopped = [name for name in stop.running if name not in stop.finished]
    not_started = len(stopped_sweep.points) - len(stop.finished) - len(stopped)
    assert stopped, f"both running points finished before {signal_name} reached them: nothing was stopped"
    lines = [line for line in stop.stderr.splitlines() if "interrupted" in line]
    assert lines == [f"orca-lora sweep: interrupted by {signal_name}: {len(stopped)} running point(s) stopped, "
                     f"each resumes on the next launch; {not_started} not started; run the same command to go on"]
    assert stop.stderr.rstrip().endswith(lines[0]) and "Traceback" not in stop.stderr
    for name in stopped:  # each interrupted run says so, attempt by attempt
        log = (stopped_sweep.directory / name / "run.log").read_text()
        assert re.search(r"sweep point \S+: interrupted by SIGTERM.*; the next launch of the sweep resumes", log)


@pytest.mark.slow
@pytest.mark.xdist_group("sweep_launches")
def test_two_launches_at_once_finish_the_stopped_sweep_each_point_once(stopped_sweep):
    assert [run.process.returncode for run in stopped_sweep.finishing] == [0, 0], \
        [run.stderr[-2000:] for run in stopped_sweep.finishing]
    counts = [re.search(r"sweep four: (\d+) run, (\d+) finished earlier, (\d+) running elsewhere, 0 failed",
                        run.stdout) for run in stopped_sweep.finishing]
    left = len(stopped_sweep.points) - len(stopped_sweep.stops["SIGINT"].finished)
    assert all(counts) and sum(int(found.group(1)) for found in counts) == left
    for name in stopped_sweep.points:
        run = stopped_sweep.directory / name
        assert json.loads((run / "metrics.json").read_text())["test_error"] >= 0
        assert (run / "run.log").read_text().count("stage3: finished in") == 1, f"{name}: trained twice"
        assert not (run / "failed.txt").exists()


WATCHED_CHILD = """\
import os, signal, sys, threading, time
from orca_lora.sweeps.pool import watch_parent
mark = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *_: (open(mark, "w").write("stopped"), os._exit(143)))
threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
open(mark + ".ready", "w").close()
time.sleep(60)
"""
PARENT = """\
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""


def test_a_worker_whose_sweep_died_stops_its_point(tmp_path):
    """`watch_parent` in a process whose parent is SIGKILLed: it stops the process as the sweep would."""
    mark = tmp_path / "mark"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED_CHILD, str(mark)])
    deadline = time.monotonic() + 60
    while not mark.with_suffix(".ready").exists():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    parent.kill()  # SIGKILL: the sweep process gets no word in
    parent.wait()
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mark.read_text() == "stopped"
