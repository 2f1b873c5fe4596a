"""Run the benchmarks and print a table per entry: ``python -m benchmarks [--quick] [--json FILE] [NAME ...]``."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path


def _entries() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def _format(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in cols}
    head = " | ".join(c.ljust(widths[c]) for c in cols)
    sep = "-+-".join("-" * widths[c] for c in cols)
    body = [" | ".join(cell(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([head, sep, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"entries to run (default: all of {', '.join(_entries())})")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}; python {platform.python_version()}")
    names = args.names or _entries()
    unknown = sorted(set(names) - set(_entries()))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(_entries())}")
    all_rows = {}
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        t0 = time.perf_counter()
        rows = mod.run(quick=args.quick)
        print(f"\n## {name}  ({time.perf_counter() - t0:.1f} s)")
        print(_format(rows) if rows else "(no rows)")
        all_rows[name] = rows
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": all_rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
