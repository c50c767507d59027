"""Progress lines: rate and ETA from the work done, an ETA bound where the work may end early, a note."""

from __future__ import annotations

import logging

from competency_gaps.progress import Progress

log = logging.getLogger("test_progress")


def test_the_line_gives_rate_elapsed_and_eta():
    progress = Progress(log, "scored", 100, "options")
    progress.done = 25
    assert progress.line(5.0) == "scored: 25 / 100 options (5 options/s, elapsed 5 s, ETA 15 s)"


def test_work_that_may_end_early_gives_its_eta_as_a_bound_and_a_note():
    progress = Progress(log, "decoding", 512, "steps", total_is_bound=True)
    progress.done = 256
    assert progress.line(128.0, "11 of 40 rows still decoding") == (
        "decoding: 256 / 512 steps (2 steps/s, elapsed 128 s, ETA at most 128 s); 11 of 40 rows still decoding")


def test_update_logs_at_most_every_interval_and_at_the_end(caplog):
    progress = Progress(log, "read", 3, "tokens", every_s=3600.0)
    with caplog.at_level("INFO", logger="test_progress"):
        progress.update(1)
        progress.update(1)
        assert caplog.text == ""  # within the interval: nothing yet
        progress.update(1, "done")
    assert "read: 3 / 3 tokens" in caplog.text and caplog.text.rstrip().endswith("; done")
