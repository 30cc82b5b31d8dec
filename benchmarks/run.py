"""Run every benchmarks/bench_*.py and print one Markdown table (`make bench`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def main() -> int:
    torch.set_num_threads(2)
    here = Path(__file__).parent
    only = sys.argv[1:]
    rows = []
    for path in sorted(here.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        print(f"running {path.stem} ...", file=sys.stderr, flush=True)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rows += module.run()
    print("| benchmark | setting | measurement | value | target | met |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        met = "" if "ok" not in row else ("yes" if row["ok"] else "NO")
        cells = [row["benchmark"], row["setting"], row["measurement"], row["value"], row["target"], met]
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
