"""The README's generated quickstart block: no placeholder words left, the markers that
`make readme` (tests/e2e/readme_quickstart.py) writes between are in place, and its trimming keeps
Temper's lines and drops Ray's."""

from __future__ import annotations

import re
from pathlib import Path

from e2e.readme_quickstart import OUTPUT_MARKERS, TIME_MARKERS, trim

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_has_no_placeholder_words():
    for word in ("QUICKSTART_TIME", "QUICKSTART_OUTPUT", "TODO", "TBD"):
        assert word not in README, word


def test_readme_quickstart_markers_hold_a_time_and_a_run():
    for begin, end in (TIME_MARKERS, OUTPUT_MARKERS):
        assert README.count(begin) == 1 and README.count(end) == 1, (begin, end)
        assert README.index(begin) < README.index(end)
    time_text = README.split(TIME_MARKERS[0])[1].split(TIME_MARKERS[1])[0]
    assert re.fullmatch(r"(\d+ min )?\d+ s", time_text), time_text
    output = README.split(OUTPUT_MARKERS[0])[1].split(OUTPUT_MARKERS[1])[0]
    for stage in ("[1/4 train]", "[2/4 register]", "[3/4 compress]", "[4/4 serve]", "== Temper run summary"):
        assert stage in output, stage
    assert "$ python -m app registry compare --model quickstart-digits" in README


def test_trim_keeps_our_lines_and_drops_rays():
    console = "\n".join([
        "2026-11-25 22:18:15,909\tINFO usage_lib.py:448 -- Usage stats collection is disabled.",
        "[1/4 train] quickstart-digits: 2 workers x 400 steps",
        "(RayTrainWorker pid=123) [train] step 50/400 loss 1.20",
        "(RayTrainWorker pid=123, ip=10.0.0.1) [eval] step 100 val_accuracy 0.90",
        "(pid=44) INFO something internal",
        "== Temper run summary: model 'quickstart-digits' ==",
        "versions:",
        "(ServeController pid=9) INFO 2026-11-25 shutting down",
        "served: v4 at http://127.0.0.1:8000/api/v1/",
    ])
    assert trim(console).splitlines() == [
        "[1/4 train] quickstart-digits: 2 workers x 400 steps", "[train] step 50/400 loss 1.20",
        "[eval] step 100 val_accuracy 0.90", "== Temper run summary: model 'quickstart-digits' ==", "versions:",
        "served: v4 at http://127.0.0.1:8000/api/v1/",
    ]
