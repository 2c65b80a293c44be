"""Where a mesh agent's probing thread spends its time, from a py-spy raw profile.

    py-spy record --subprocesses --threads --rate 2000 --format raw -o prof.txt -- \\
        python benchmarks/mesh.py --steady-only --repeat 5
    python benchmarks/agent_profile.py prof.txt

(py-spy wraps the benchmark, not the agents: its own messages go to the benchmark's terminal,
never into an agent's protocol stream.) Only the samples of the agents' probing threads count
(stacks through ``probe_slice``). Each sample goes to the category of its innermost known
frame, except that a sample inside an import is an import (modules compiled at first use:
with PYTHONDONTWRITEBYTECODE set and no __pycache__, every agent compiles them again).
"""

from __future__ import annotations

import collections
import sys

IMPORTS = "imports (module loading, compiling)"
CATEGORIES = (
    ("encode result lines", ("encode_results", "_Lines.", "result_dict")),
    ("write to the channel", ("NdjsonOutput.", "Channel.")),
    ("annotate (verdicts, plan index)", ("annotate",)),
    ("SynProber.send (sendto)", ("SynProber.send",)),
    ("SynProber._on_tcp (recv, parse)", ("SynProber._on_tcp",)),
    ("plan (flows)", ("probe_slice.<locals>.flows", "plan (", "legs (", "Leg.")),
    ("Sweep bookkeeping", ("Sweep.",)),
    ("Engine (emit, hosts, tokens)", ("Engine.", "HostState.", "_run.<locals>")),
)


def split(path: str) -> tuple[int, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if "scanner agent" not in stack or "probe_slice" not in stack or not n.isdigit():
                continue
            total += int(n)
            frames = stack.split(";")
            if any("_find_and_load" in f for f in frames):
                counts[IMPORTS] += int(n)
                continue
            for f in reversed(frames):
                hit = next((c for c, keys in CATEGORIES if any(k in f for k in keys)), None)
                if hit is not None:
                    counts[hit] += int(n)
                    break
            else:
                counts["other"] += int(n)
    return total, counts


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for path in argv:
        total, counts = split(path)
        rest = total - counts[IMPORTS]
        print(f"{path}: {total} samples in agents' probing threads, {rest} outside imports")
        if not rest:
            continue
        print(f"  {IMPORTS:40s} {100 * counts[IMPORTS] / total:5.1f}% of all")
        for name in [c for c, _ in CATEGORIES] + ["other"]:
            print(f"  {name:40s} {100 * counts[name] / rest:5.1f}% of the samples outside imports")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
