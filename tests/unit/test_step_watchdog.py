"""The worker's step watchdog: a step stuck past the limit ends the process with status 86."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from services.worker.watchdog import WATCHDOG_EXIT_CODE, StepWatchdog


def test_overdue_only_while_a_step_runs() -> None:
    dog = StepWatchdog(10.0, "w0")
    assert dog.overdue(now=1e9) == 0.0  # idle: never overdue
    dog.step_began()
    assert dog.overdue() < 0
    assert dog.overdue(now=dog._started_at + 11) > 0  # type: ignore[operator]
    dog.step_ended()
    assert dog.overdue(now=1e9) == 0.0
    assert StepWatchdog(0, "off").overdue(now=1e9) == 0.0


def test_a_stuck_step_exits_the_process_with_its_status() -> None:
    code = textwrap.dedent("""
        import logging, time
        logging.basicConfig(level=logging.INFO)
        from services.worker.watchdog import StepWatchdog
        dog = StepWatchdog(0.3, "w-stuck")
        dog.start()
        dog.step_began()
        time.sleep(30)  # the wedged step
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == WATCHDOG_EXIT_CODE == 86
    assert proc.stderr.count("engine step stuck") == 1 and "w-stuck" in proc.stderr
