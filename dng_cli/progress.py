"""Progress with an ETA: a tqdm bar on a terminal, a log line every ``every`` seconds elsewhere (SLURM logs, nohup).

``Progress(total, desc, unit)`` counts units of work (sampling steps × batches, reference batches, grid points);
``update(n, items)`` adds n units and the items (samples, images) they finished, for the items/s shown. The ETA is
the remaining units at the average rate so far. ``enabled=False`` (``sampler.progress=false``) silences it.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("dng.progress")


def duration(seconds: float) -> str:
    """12 s, 4.5 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "step", items: str = "samples", enabled: bool = True,
                 every: float = 30.0, stream=None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.items = max(int(total), 0), desc, unit, items
        self.enabled, self.every, self.clock = enabled, float(every), clock
        self.done, self.items_done = 0, 0
        self.start = self.last = clock()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)

    def eta(self) -> float | None:
        elapsed = self.clock() - self.start
        if self.done == 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self) -> str:
        elapsed = self.clock() - self.start
        eta = self.eta()
        rate = f", {self.items_done / elapsed:.2f} {self.items}/s" if self.items_done and elapsed > 0 else ""
        pct = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f} %){rate}, "
                f"{duration(elapsed)} elapsed" + (f", ETA {duration(eta)}" if eta is not None else ""))

    def update(self, n: int = 1, items: int = 0) -> None:
        if not self.enabled:
            return
        self.done += n
        self.items_done += items
        if self.bar is not None:
            if items:
                elapsed = self.clock() - self.start
                self.bar.set_postfix_str(f"{self.items_done / max(elapsed, 1e-9):.2f} {self.items}/s", refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
