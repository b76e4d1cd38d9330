"""Screenshot an mtrank HTML report in headless Chromium and fail on browser console errors.

Usage:
    python scripts/screenshot_report.py runs/quickstart/report.html docs/report.png \
        [--size 1400,3000]

Needs Debian's ``chromium`` (``apt-get install -y chromium``) or ``$CHROMIUM``. Runs offline
(background networking and component updates off, a throw-away profile). Chromium's
``--enable-logging=stderr --v=0`` prints every page console message (all at INFO level, so
errors cannot be told from logs) as an ``INFO:CONSOLE:<line>]`` line; the report has no
scripts, so any console line, and any failed resource load, fails the check (exit code 1).
D-Bus noise of a container without a session bus is ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONSOLE = re.compile(r":[A-Z]+:CONSOLE[:(]\d+\)?\] (.*)")
LOAD_FAILED = re.compile(r"net::ERR_|Failed to load resource|Not allowed to load local resource")


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    sys.exit("no chromium found: apt-get install -y chromium (or set $CHROMIUM)")


def screenshot(report: Path, png: Path, size: str) -> list[str]:
    """Take the screenshot; return the console / load problems Chromium reported."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            find_chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={png.resolve()}",
            f"--window-size={size}",
            report.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    problems = []
    for line in proc.stderr.splitlines():
        if CONSOLE.search(line) or LOAD_FAILED.search(line):
            problems.append(line)
    if proc.returncode != 0 or not png.is_file():
        problems.append(f"chromium exited with {proc.returncode}: {proc.stderr[-500:]}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the HTML report")
    ap.add_argument("png", type=Path, help="the screenshot to write")
    ap.add_argument(
        "--size", default="1400,3000", help="window size WIDTH,HEIGHT (default 1400,3000)"
    )
    args = ap.parse_args()
    problems = screenshot(args.report, args.png, args.size)
    for p in problems:
        print(f"console: {p}", file=sys.stderr)
    print(
        f"wrote {args.png} ({args.png.stat().st_size / 1e6:.2f} MB); console errors: "
        f"{len(problems)}"
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
