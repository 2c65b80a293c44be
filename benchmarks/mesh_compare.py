"""Compare two runs of ``benchmarks/mesh.py --simulate N -o FILE --summary-to TEXT``.

    python benchmarks/mesh_compare.py OLD.ndjson OLD.txt NEW.ndjson NEW.txt

Used to show that a change to the coordinator changes no verdict: the result and tally lines
(as multisets: agents interleave in any order), the pair records (in order), the host and
summary records and the human summary must be identical, less what differs between any two
runs (scan_id, timestamps, elapsed times and rates). Exit 0 when identical, 1 with the first
differences otherwise.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import orjson

VOLATILE = ("scan_id", "ts", "elapsed_s", "started", "finished")


def _clean(rec: dict) -> dict:
    for k in VOLATILE:
        rec.pop(k, None)
    if rec.get("type") == "summary":
        for a in (rec.get("agents") or {}).values():
            a.pop("elapsed_s", None)
            a.pop("rate_pps", None)
        rec.pop("rate_pps", None)
    if rec.get("type") == "start":
        rec.pop("argv", None)
        (rec.get("plan") or {}).pop("site", None)  # a temporary inventory file
    return rec


def normalise(path: Path) -> dict[str, object]:
    lines: Counter[bytes] = Counter()
    ordered: list[bytes] = []
    for raw in path.read_bytes().splitlines():
        rec = _clean(orjson.loads(raw))
        line = orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)
        if rec.get("type") in ("result", "tally"):
            lines[line] += 1
        else:
            ordered.append(line)
    return {"lines": lines, "ordered": ordered}


def normalise_text(path: Path) -> list[str]:
    text = re.sub(r"\(\d+\.\d+s\)", "(Xs)", path.read_text())
    return text.splitlines()


def main(argv: list[str]) -> int:
    old_nd, old_txt, new_nd, new_txt = (Path(a) for a in argv)
    a, b = normalise(old_nd), normalise(new_nd)
    bad = 0
    if a["lines"] != b["lines"]:
        diff = (a["lines"] - b["lines"]) + (b["lines"] - a["lines"])  # type: ignore[operator]
        print(f"result/tally lines differ: {sum(diff.values())} lines, e.g.")
        for line in list(diff)[:3]:
            print("  ", line.decode()[:300])
        bad = 1
    if a["ordered"] != b["ordered"]:
        for x, y in zip(a["ordered"], b["ordered"], strict=False):  # type: ignore[call-overload]
            if x != y:
                print("records differ:\n  ", x.decode()[:400], "\n  ", y.decode()[:400])
                break
        print(f"start/host/pair/summary records: {len(a['ordered'])} vs {len(b['ordered'])}")  # type: ignore[arg-type]
        bad = 1
    ta, tb = normalise_text(old_txt), normalise_text(new_txt)
    if ta != tb:
        for x, y in zip(ta, tb, strict=False):
            if x != y:
                print("summary text differs:\n  ", x, "\n  ", y)
                break
        print(f"summary text: {len(ta)} vs {len(tb)} lines")
        bad = 1
    n = sum(a["lines"].values())  # type: ignore[attr-defined]
    print(("DIFFERENT" if bad else "identical") + f": {n} result/tally lines, "
          f"{len(a['ordered'])} other records, {len(ta)} summary lines")  # type: ignore[arg-type]  # fmt: skip
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
