"""Progress with an ETA: a bar on a terminal, a log line every ~30 s elsewhere, nothing with progress=false; sampling
counts steps × batches and the samples they finished."""

import io
import logging

from dng_cli import progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_line_every_30_s_with_rate_and_eta(caplog):
    clock = Clock()
    bar = progress.Progress(100, "sampling 200 images", stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="dng.progress"):
        for k in range(50):
            clock.t += 2.0  # 2 s per step; 4 samples finish every 10 steps
            bar.update(1, 4 if k % 10 == 9 else 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # at 30, 60 and 90 s of 100 s
    assert lines[-1] == "sampling 200 images: 45/100 steps (45 %), 0.18 samples/s, 1.5 min elapsed, ETA 1.8 min"
    assert bar.eta() == 100.0  # 50 steps in 100 s: 50 more take 100 s


def test_on_a_terminal_a_bar_and_nothing_when_disabled(caplog):
    tty = Tty()
    with progress.Progress(10, "reference features", unit="batch", items="images", stream=tty) as bar:
        for _ in range(10):
            bar.update(1, 32)
        assert (bar.bar.n, bar.bar.total) == (10, 10) and "images/s" in bar.bar.postfix
    assert "reference features" in tty.getvalue() and bar.bar is None
    quiet, clock = Tty(), Clock()
    with caplog.at_level(logging.INFO, logger="dng.progress"):
        bar = progress.Progress(10, "x", enabled=False, stream=quiet, clock=clock)
        for _ in range(10):
            clock.t += 100
            bar.update(1, 5)
        bar.close()
    assert quiet.getvalue() == "" and caplog.records == []


def test_sampling_counts_steps_times_batches(compose, monkeypatch, tmp_path):
    from dng_cli.commands import sample

    seen = []

    class Recorder(progress.Progress):
        def __init__(self, total, desc, **kw):
            super().__init__(total, desc, **{**kw, "stream": io.StringIO()})
            seen.append(self)

    monkeypatch.setattr(progress, "Progress", Recorder)
    sample.run(compose("sample", ["model=tiny_random", "n_samples=5", "sampler.steps=3", "sampler.batch_size=2"]),
               tmp_path / "run")
    (bar,) = seen
    assert (bar.total, bar.done, bar.items_done) == (9, 9, 5)  # 3 batches x 3 steps; 5 samples
    assert bar.desc == "sampling 5 images"
