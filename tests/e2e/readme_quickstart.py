"""Regenerate the README's quickstart block from a real run (`make readme`).

Runs `python -m app run configs/quickstart.yaml` the way a new user does (an embedded Ray, the
shipped config unchanged) in a scratch folder holding a copy of `configs/`, measures its wall
time, and rewrites two places of README.md:

- between `<!-- quickstart-time -->` and `<!-- /quickstart-time -->`: the wall time;
- between `<!-- quickstart-output -->` and `<!-- /quickstart-output -->`: the console, trimmed to
  Temper's own lines (tagged `[ray]`, `[1/4 train]`, `[train]`, ...; Ray's log lines and the
  `(RayTrainWorker pid=...)` prefixes are dropped) and the run summary;

and the Registry section's `$ python -m app registry compare ...` example, re-run against the
registry that run just made.

When port 8000 is taken (another app on the machine), Serve gets a free port and the output is
shown with 8000, the port the shipped config names.

Usage: python tests/e2e/readme_quickstart.py [--readme README.md] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000
MAX_LINES = 60
TIME_MARKERS = ("<!-- quickstart-time -->", "<!-- /quickstart-time -->")
OUTPUT_MARKERS = ("<!-- quickstart-output -->\n```\n", "```\n<!-- /quickstart-output -->")
COMPARE = "python -m app registry compare --model quickstart-digits 1 4"

ACTOR_PREFIX = re.compile(r"^\((?:[A-Za-z_][\w.]*\s+)?pid=\d+(?:,\s*ip=[\d.]+)?\)\s*")
OUR_TAG = re.compile(r"^\[(?:\d/\d )?[a-z][a-z0-9 _-]*\] ")
RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:|^\[\d{4}-|^\s*(INFO|WARNING|ERROR)\b|^\w+Warning:|^\s+warnings\.warn")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def trim(console: str) -> str:
    """Temper's own lines of a run's console, in order, without Ray's."""
    kept, in_summary = [], False
    for raw in console.splitlines():
        line = ACTOR_PREFIX.sub("", raw.rstrip())
        if line.startswith("== Temper run summary"):
            in_summary = True
        if OUR_TAG.match(line) or (in_summary and line == raw.rstrip() and not RAY_LOG.match(line)):
            kept.append(line)
    if len(kept) > MAX_LINES:
        head = MAX_LINES * 2 // 3
        kept = kept[:head] + [f"... ({len(kept) - MAX_LINES} lines)"] + kept[-(MAX_LINES - head):]
    return "\n".join(kept)


def replace_between(text: str, begin: str, end: str, new: str) -> str:
    i = text.index(begin) + len(begin)
    j = text.index(end, i)
    return text[:i] + new + text[j:]


def wall_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary folder, removed)")
    args = ap.parse_args(argv)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="temper-readme-"))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "configs", folder / "configs", dirs_exist_ok=True)
    port = PORT if port_free(PORT) else None
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = folder / "configs" / "quickstart.yaml"
        config.write_text(re.sub(rf"(?m)^(\s*port:\s*){PORT}\b", rf"\g<1>{port}", config.read_text()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray, as on a laptop
    cmd = [sys.executable, "-m", "app", "run", "configs/quickstart.yaml"]
    print(f"[readme] {' '.join(cmd[1:])} in {folder}", flush=True)
    t0 = time.monotonic()
    # one stream, so Ray's lines and ours keep their order
    proc = subprocess.run(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        print(proc.stdout[-8000:], file=sys.stderr)
        print(f"[readme] the quickstart failed (exit {proc.returncode}); README.md left as it was", file=sys.stderr)
        return 1
    output = trim(proc.stdout).replace(f"{folder.resolve()}/", "")  # paths as seen from the checkout
    if port != PORT:
        output = output.replace(f"127.0.0.1:{port}", f"127.0.0.1:{PORT}")
    compare = subprocess.run([sys.executable, *COMPARE.split()[1:]], cwd=folder, env=env, capture_output=True, text=True)
    if compare.returncode != 0:
        print(compare.stdout[-3000:], compare.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1

    text = args.readme.read_text()
    text = replace_between(text, *TIME_MARKERS, wall_time(seconds))
    text = replace_between(text, *OUTPUT_MARKERS, output + "\n")
    start = text.index("```\n$ python -m app registry compare ")
    end = text.index("\n```\n", start + 4)
    text = text[:start] + f"```\n$ {COMPARE}\n{compare.stdout.rstrip()}" + text[end:]
    args.readme.write_text(text)
    print(f"[readme] {args.readme}: quickstart {wall_time(seconds)}, {len(output.splitlines())} output lines", flush=True)
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
