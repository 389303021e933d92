"""Peak resident memory of a block of code on the CPU (CUDA has the allocator's own peak counter).

Used by the runner's per-stage `peak_memory` and by `experiments.bench_memory`, so both measure the same way.
Linux only (`/proc/self`); standard library only.
"""

from __future__ import annotations

import os
import threading


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    """The kernel's resident high-water mark (`VmHWM`) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRSS:
    """Peak resident memory over a block: CPU has no allocator peak counter like CUDA's. Uses the kernel's exact
    high-water mark when it can be reset; otherwise samples RSS in a background thread (may miss short peaks).
    A block nested in an exact one samples, since resetting the mark would corrupt the outer block's peak."""

    _exact_active = 0  # exact blocks open in this process (the kernel's mark is per process)

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = rss_bytes()
        self.exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.exact = PeakRSS._exact_active == 0 and reset_peak_rss()
        PeakRSS._exact_active += self.exact
        if not self.exact:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            self.peak = max(self.peak, hwm_bytes())
            PeakRSS._exact_active -= 1
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
