"""`make test`: the suite as two pytest processes at once, `tests/ray` beside the rest.

Why: sampled from /proc/stat on a 2-core machine, a sequential run keeps the cores ~70% busy. A
Ray test spends much of its time waiting (a Serve deployment coming up, a Train controller
polling its workers, a subprocess connecting), so a second stream of tests fills that gap. The
split keeps one Ray cluster at a time per pytest process: `tests/ray` has its embedded cluster
(`tests/conftest.py`); in the other stream the unit tests start no Ray, `tests/e2e` runs on a
`ray start` cluster in a private temp folder, stopped before that stream's one `tests/ray` file
(`MOVED`) starts an embedded cluster of its own. The two streams share nothing but the machine:
their own temp folders, PostgreSQL servers and ports picked at random.

Usage: `python tests/parallel_suites.py [pytest options]`. Given a test path, it runs one
ordinary pytest over what was asked for instead. `--junitxml=FILE` gives each stream its own
file (`FILE` with `-ray` / `-rest` before the suffix). The Ray stream prints as it goes; the
other stream's output is kept in a file and printed in full when both have finished, after a
one-line notice when it ends. The exit status is the first non-zero one of the two (a stream that
collected nothing counts as passed when the other ran tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TESTS = 5  # pytest's exit status when nothing was collected
MOVED = "tests/ray/test_registry_actor.py"
"""A Ray test run at the end of the other stream, on that stream's own embedded cluster (started
once e2e's has stopped), so both streams end together: measured in one run on 2 cores, tests/ray
alone ended ~400 s after the rest, and this file takes ~150 s run alone."""
STREAMS = {"ray": ["tests/ray", f"--ignore={MOVED}"], "rest": ["tests/unit", "tests/gpu", "tests/e2e", MOVED]}

REST = " ".join(STREAMS["rest"])


def names_a_path(arg: str) -> bool:
    """Whether a command-line word selects tests by path (`tests/unit`, `x.py::test_y`)."""
    return not arg.startswith("-") and (os.path.exists(arg.split("::")[0]) or "::" in arg)


def stream_args(args: list[str], stream: str) -> list[str]:
    """`args` for one stream: a `--junitxml` file gets the stream's name before its suffix."""
    out = []
    for arg in args:
        if arg.startswith("--junitxml="):
            path = Path(arg.split("=", 1)[1])
            suffix = path.suffix or ".xml"
            arg = f"--junitxml={path.with_name(path.stem + '-' + stream + suffix)}"
        out.append(arg)
    return out


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    if any(names_a_path(arg) for arg in args):
        return subprocess.call(pytest + args, cwd=ROOT)
    # The two streams share two cores: torch and ONNX Runtime in each pytest process (and what it
    # starts without its own setting) use one thread, not one per core. Measured on five unit-test
    # files that run models in the test process: 61.7 CPU-s with one thread, 76.0 with two (the
    # second thread mostly waits for work, spinning), in 64 s vs 58 s of wall time when run alone;
    # beside another stream that CPU is what the other stream lacks. A value set by the caller wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.NamedTemporaryFile("w+", prefix="temper-tests-rest-", suffix=".log") as log:
        rest = subprocess.Popen(pytest + stream_args(args, "rest") + STREAMS["rest"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

        def announce() -> None:
            code = rest.wait()
            print(f"\n[tests] {REST} finished (exit {code}); its output follows the Ray tests'",
                  flush=True)

        watcher = threading.Thread(target=announce, daemon=True)
        watcher.start()
        try:
            ray_code = subprocess.call(pytest + stream_args(args, "ray") + STREAMS["ray"], cwd=ROOT, env=env)
        except KeyboardInterrupt:
            rest.terminate()
            raise
        rest_code = rest.wait()
        watcher.join()
        log.seek(0)
        print(f"\n{'=' * 30} {REST} {'=' * 30}", flush=True)
        sys.stdout.write(log.read())
        sys.stdout.flush()
    print(f"[tests] tests/ray exit {ray_code}, {REST} exit {rest_code}", flush=True)
    if NO_TESTS in (ray_code, rest_code) and {ray_code, rest_code} != {NO_TESTS}:
        # a `-k` or `-m` that selects tests in one stream only: the other collecting none is no failure
        ray_code, rest_code = (0 if c == NO_TESTS else c for c in (ray_code, rest_code))
    return ray_code or rest_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
