"""Smoke test of the benchmark entry points at their smallest configuration (seconds).

Checks that ``benchmarks/run.py`` writes well-formed JSON/CSV/PNG outputs and that the few
numbers with a known answer have it (the collapsed penalty equals the naive per-task sum, the
exact Fisher equals the brute-force one, the state of ``ewc`` does not grow with tasks).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.run import main

    out = tmp_path_factory.mktemp("bench")
    results = main(["--smoke", "--out", str(out), "--suites", "penalty,fisher,quality"])
    return out, results


def _rows(results: dict, table: str) -> list[dict]:
    rows = results["tables"][table]
    assert rows, f"table {table} is empty"
    return rows


def test_outputs_are_written_and_well_formed(smoke_run: tuple[Path, dict]) -> None:
    out, _ = smoke_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["mode"] == "smoke"
    assert set(on_disk["suites"]) == {"penalty", "fisher", "quality"}
    for table, rows in on_disk["tables"].items():
        with (out / f"{table}.csv").open() as handle:
            from_csv = list(csv.DictReader(handle))
        assert len(from_csv) == len(rows), table
        assert list(from_csv[0]) == list(rows[0]), table
    for png in ("penalty_cost.png", "quality_split_digits.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, png


def test_penalty_suite_numbers(smoke_run: tuple[Path, dict]) -> None:
    _, results = smoke_run
    rows = _rows(results, "penalty_cost")
    methods = {r["method"] for r in rows}
    assert {"step", "ewc.penalty_grad_", "ewc.penalty", "naive"} <= methods
    for r in rows:
        assert r["ms_per_step"] > 0
        if r["method"].startswith("ewc") or r["method"] == "avalanche":
            assert r["penalty_rel_diff_vs_naive"] < 1e-5, r
    ours = [r["state_MB"] for r in rows if r["method"] == "ewc.penalty_grad_"]
    naive = [r["state_MB"] for r in rows if r["method"] == "naive"]
    assert len(set(ours)) == 1, "the collapsed state must not grow with tasks"
    assert naive[-1] > naive[0], "the naive per-task state grows with tasks"
    assert any(
        r["method"] == "ewc.penalty_grad_" for r in _rows(results, "penalty_overhead_headline")
    )


def test_penalty_floor_rows_place_the_kernel_against_the_hardware(
    smoke_run: tuple[Path, dict],
) -> None:
    from benchmarks.penalty_cost import (
        FLOOR,
        FUSED,
        KERNEL_ON_FLOOR_TRAFFIC,
        SAME_TRAFFIC,
        TRAFFIC_ROUND_FLOOR,
    )

    _, results = smoke_run
    rows = _rows(results, "penalty_vs_floor")
    for model in {r["model"] for r in rows}:
        for threads in (1, 2):
            mine = {r["method"]: r for r in rows if r["model"] == model and r["threads"] == threads}
            assert {FLOOR, "ewc.penalty_grad_"} <= set(mine), (model, threads)
            assert mine[FLOOR]["ratio_to_floor"] == 1.0
            if FUSED in mine:  # the kernel built: the two traffic rows are there, timed
                assert mine[TRAFFIC_ROUND_FLOOR]["ratio_to_floor"] == 1.0  # their reference
                for method in (SAME_TRAFFIC, KERNEL_ON_FLOOR_TRAFFIC):
                    assert mine[method]["ms"] > 0 and mine[method]["ratio_to_floor"] > 0


@pytest.mark.integration  # real Avalanche as the baseline
def test_fisher_floor_rows_add_the_squares_for_convolutions() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import benchmarks.fisher_speed as fisher_speed

    rows = fisher_speed.floor_rows(quick=True, threads=1)
    if not rows:
        pytest.skip("Avalanche is not installed: the floor rows need its baseline")
    methods = {name: {r["method"] for r in rows if r["model"] == name} for name in ("cnn", "mlp")}
    assert methods["cnn"] == {"ewc", "floor", "avalanche", fisher_speed.FLOOR_WITH_SQUARES}
    assert methods["mlp"] == {"ewc", "floor", "avalanche"}  # no convolution: nothing to square
    assert all(r["seconds"] > 0 for r in rows)


def test_fisher_suite_numbers(smoke_run: tuple[Path, dict]) -> None:
    _, results = smoke_run
    rows = {r["method"]: r for r in _rows(results, "fisher_fidelity")}
    assert {"exact", "sample", "empirical", "batched"} <= set(rows)
    for method in ("exact", "empirical", "batched"):
        assert rows[method]["rel_err_vs_own_definition"] < 1e-4, rows[method]
    assert rows["exact"]["rel_err_vs_exact"] < 1e-4
    assert all(r["examples_per_s"] > 0 for r in rows.values())


def test_quality_suite_numbers(smoke_run: tuple[Path, dict]) -> None:
    _, results = smoke_run
    best = {r["method"]: r for r in _rows(results, "quality_split_digits")}
    assert set(best) == {"exact", "exact(n=N/4)", "sample", "empirical", "batched", "none"}
    for row in best.values():
        assert 0.0 <= row["best_accuracy_%"] <= 100.0
    paper = {r["estimator"]: r for r in _rows(results, "quality_vs_published_split_mnist")}
    assert set(paper) == set(best)
    for name, row in paper.items():  # our column is this run's result, not a constant
        assert row["ours_split_digits_%"] == best[name]["best_accuracy_%"], name
    perm = {r["method"] for r in _rows(results, "quality_permuted_digits")}
    assert perm == {"fine-tuning", "ewc separate", "ewc online"}


def test_split_digits_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "split_digits.py"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Fine-tuning (no EWC)" in done.stdout
    assert "final mean accuracy" in done.stdout
