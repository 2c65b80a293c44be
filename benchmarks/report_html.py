"""The HTML report at 1,000 hosts: size, render time, and how long headless Chromium takes to
load it and run its script (``--dump-dom`` returns after the page's scripts ran).

    python benchmarks/report_html.py [--runs 3]

The input is the synthetic mesh of tests/test_report_scale.py (1,000 hosts, five requirements,
1% of the directions failing: structured faults plus scattered ones), written once.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import random

    from test_report_scale import faults, write_results

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory(prefix="pm-report-bench-") as tmp:
        t = Path(tmp)
        src = t / "mesh-1000.ndjson"
        write_results(src, faults(random.Random(1000)))
        html = t / "report.html"
        renders, loads = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "scanner", "report", str(src), "--format", "html",
                 "-o", str(html)],
                check=False, capture_output=True,
            )  # fmt: skip
            renders.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cp = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={t / 'profile'}", "--dump-dom", html.as_uri()],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            loads.append(time.perf_counter() - t0)
            assert 'data-ready="1"' in cp.stdout, "the page script did not finish"
        print(f"input: {src.stat().st_size / 1e6:.0f} MB NDJSON, 1,000 hosts")
        print(f"html: {html.stat().st_size / 1e6:.2f} MB")
        print(f"portmesh report --format html: median {statistics.median(renders):.1f} s of {args.runs}")
        print(f"chromium --headless --dump-dom: median {statistics.median(loads):.1f} s of {args.runs}")


if __name__ == "__main__":
    main()
