"""Run every benchmark suite: print tables, write plots (PNG), JSON and CSV results.

    python benchmarks/run.py            # full run (the README's numbers)
    python benchmarks/run.py --quick    # about 4 minutes on 2 CPU cores
    python benchmarks/run.py --quick --out /tmp/bench --suites penalty,quality

Suites: ``penalty`` (penalty cost vs number of tasks, vs Avalanche), ``fisher`` (Fisher cost and
fidelity vs the brute-force per-example Fisher and Avalanche), ``quality`` (continual-learning
accuracy on Split/Permuted Digits, after van de Ven 2025), and ``fisher_speed`` (speed ratios vs
Avalanche, ``benchmarks/fisher_speed.py``, when present), ``mnist1d`` (task-incremental Split
MNIST-1D per estimator on a 1-D CNN) and ``class_incremental`` (exemplar-free class-incremental
MNIST-1D: EWC, online EWC, EWC-DR, MAS, fine-tuning).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import Row, format_table, write_csv, write_json  # noqa: E402

__all__ = ["SUITES", "main"]

SUITES = ("penalty", "fisher", "quality", "fisher_speed", "mnist1d", "class_incremental")
_MODULES = {
    "penalty": "benchmarks.penalty_cost",
    "fisher": "benchmarks.fisher_fidelity",
    "quality": "benchmarks.cl_quality",
    "mnist1d": "benchmarks.mnist1d_quality",
    "class_incremental": "benchmarks.class_incremental",
}


def _fisher_speed(mode: str, out: Path) -> dict[str, list[Row]]:
    """The speed-ratio table of ``benchmarks/fisher_speed.py`` (another module), if it exists."""
    try:
        module = importlib.import_module("benchmarks.fisher_speed")
    except ModuleNotFoundError:
        print("note: benchmarks/fisher_speed.py is not there yet; skipping its table")
        return {}
    if mode == "smoke":  # its smallest configuration is its quick one; too slow for a smoke test
        return {}
    quick = mode != "full"
    tables = {"fisher_speed": list(module.run(quick=quick))}
    for table, rows in (
        ("fisher_resnet18", "resnet_rows"),
        ("fisher_vs_backpack", "backpack_rows"),
        ("fisher_floor", "floor_rows"),
        ("fisher_hugging_face", "hugging_face_rows"),
    ):
        if hasattr(module, rows):
            tables[table] = list(getattr(module, rows)(quick))
    return tables


def _suite(name: str) -> Callable[[str, Path], dict[str, list[Row]]]:
    if name == "fisher_speed":
        return _fisher_speed
    return importlib.import_module(_MODULES[name]).run  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the suites, write ``results.json`` and one CSV per table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, seeds and λ values")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--suites", default=",".join(SUITES), help=f"comma-separated subset of {SUITES}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, multi-threaded kernels of these "
        "small models spend most of their time spin-waiting for busy cores)",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suites {unknown}; choose from {SUITES}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_suites(suites, mode, out)
    finally:
        torch.set_num_threads(threads)


def _run_suites(suites: list[str], mode: str, out: Path) -> dict[str, Any]:
    """Run each suite, print its tables, write one CSV per table and ``results.json``."""
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": mode,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "suites": {},
        "tables": {},
    }
    for name in suites:
        suite_start = time.perf_counter()
        print(f"\n=== {name} ({mode}) ===", flush=True)
        tables = _suite(name)(mode, out)
        seconds = time.perf_counter() - suite_start
        results["suites"][name] = {"seconds": seconds, "tables": sorted(tables)}
        for table, rows in tables.items():
            print("\n" + format_table(rows, f"[{table}]"), flush=True)
            write_csv(out / f"{table}.csv", rows)
            results["tables"][table] = rows
        print(f"\n({name}: {seconds:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    print(f"\nwrote {out}/results.json, CSV tables and PNG plots in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
