"""A pytest plugin that records every test's outcome as it happens (scripts/gpu_check.py's tests part):
a run killed from outside keeps what was done, and a test past its limit fails while the rest run."""
from __future__ import annotations

import signal


class TestRecorder:
    """A pytest plugin (handed to pytest.main, no conftest): every test's outcome, duration and
    failure message, saved after each test so that a killed run keeps them, and a per-test limit."""

    def __init__(self, out: dict, save, limit_s: float, alarm: bool):
        self.save, self.limit_s, self.alarm = save, limit_s, alarm
        self.tests: dict[str, dict] = out.setdefault("tests", {})

    def pytest_runtest_logstart(self, nodeid, location):
        self.tests[nodeid] = {"outcome": "started"}  # still "started" in the file: the test the run died in
        self.save()

    def _timeout(self, signum, frame):
        raise TimeoutError(f"over the per-test limit of {self.limit_s:.0f} s")

    def pytest_runtest_logreport(self, report):
        # The alarm covers the test's call: armed as its setup is reported (the call comes next, whatever
        # the order of other plugins' hooks), disarmed as the call is reported.
        if self.alarm and report.when == "setup" and report.passed:
            signal.signal(signal.SIGALRM, self._timeout)
            signal.setitimer(signal.ITIMER_REAL, self.limit_s)
        elif self.alarm and report.when == "call":
            signal.setitimer(signal.ITIMER_REAL, 0)
        entry = self.tests.setdefault(report.nodeid, {"outcome": "started"})
        entry["seconds"] = round(entry.get("seconds", 0.0) + report.duration, 3)
        if report.when == "call" or report.outcome != "passed":
            entry["outcome"] = "error" if report.failed and report.when != "call" else report.outcome
            if report.skipped:
                entry["reason"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            elif report.failed:
                lines = [line for line in report.longreprtext.splitlines() if line.startswith("E ")]
                entry["message"] = "\n".join(lines[:12]) if lines else report.longreprtext[-800:]
        self.save()


def count_outcomes(tests: dict) -> dict[str, int]:
    outcomes = [t["outcome"] for t in tests.values()]
    return {k: outcomes.count(k) for k in sorted(set(outcomes))}
