"""Make a process a slower device: cap its CPU time to a fraction of one core (tests and benchmarks).

    with CpuCap(node.process.pid, 0.2) as cap:   # cap.method: "cgroup" or "signals"
        ...

Where the cgroup v1 cpu controller is mounted and writable (`/sys/fs/cgroup/cpu`, as root), the process
moves into a group of its own with `cpu.cfs_quota_us` = fraction × `cpu.cfs_period_us` — the kernel's own
bandwidth control, threads and children included. Elsewhere (cgroup v2 only, no root, CI), a helper thread
runs a duty cycle of SIGCONT/SIGSTOP on the process, as `cpulimit` does: in each `period_s` the process runs
for fraction × period and is stopped for the rest (coarser: its threads stop together, and its sockets go
unanswered while stopped). `stop()` (or leaving the block) lifts the cap and leaves the process running.
`CPU_CAP_METHOD=signals` in the environment forces the duty cycle (to test the fallback where cgroups work).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


class CpuCap:
    def __init__(self, pid: int, fraction: float, period_s: float = 0.1, *,
                 allow_cgroup: bool | None = None) -> None:
        if not 0 < fraction < 1:
            raise ValueError("fraction must be in (0, 1)")
        self.pid = pid
        self.fraction = fraction
        self.period_s = period_s
        if allow_cgroup is None:
            allow_cgroup = os.environ.get("CPU_CAP_METHOD") != "signals"
        self.allow_cgroup = allow_cgroup
        self.method: str | None = None
        self._group: Path | None = None
        self._home = CGROUP_CPU
        """The cpu group the process came from (it goes back there)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> CpuCap:
        if self.allow_cgroup and self._start_cgroup():
            self.method = "cgroup"
        else:
            self._thread = threading.Thread(target=self._duty_cycle, name=f"cpu-cap-{self.pid}", daemon=True)
            self._thread.start()
            self.method = "signals"
        return self

    def _start_cgroup(self) -> bool:
        if not (CGROUP_CPU / "cgroup.procs").exists():
            return False
        home = _cpu_group(self.pid)
        if home is None:
            return False
        self._home = home
        group = CGROUP_CPU / f"shoal-test-cap-{os.getpid()}-{self.pid}"
        try:
            group.mkdir(exist_ok=True)
            period = int(self.period_s * 1_000_000)
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(period * self.fraction))))
            (group / "cgroup.procs").write_text(str(self.pid))
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            return False
        self._group = group
        return True

    def _duty_cycle(self) -> None:
        run, pause = self.period_s * self.fraction, self.period_s * (1 - self.fraction)
        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                if self._stop.wait(pause):
                    break
                os.kill(self.pid, signal.SIGCONT)
                self._stop.wait(run)
        except ProcessLookupError:
            return
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
        if self._group is not None:
            procs = (self._group / "cgroup.procs").read_text().split()
            for pid in procs:  # back where it came from (the process and any child it started)
                with contextlib.suppress(OSError):
                    (self._home / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                self._group.rmdir()
            self._group = None

    def __enter__(self) -> CpuCap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cpu_group(pid: int) -> Path | None:
    """The cgroup v1 cpu group `pid` is in, as a folder under `CGROUP_CPU` (None if it cannot be read)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            folder = CGROUP_CPU / path.lstrip("/")
            return folder if (folder / "cgroup.procs").exists() else None
    return None
