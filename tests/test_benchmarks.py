"""The benchmarks run end to end in smoke mode and report sane numbers (no timing thresholds)."""
import importlib.util
import math

from conftest import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_smoke_gives_one_finite_positive_ratio_per_method(capsys):
    overhead = load("overhead")
    rows = overhead.main(["--smoke", "--threads", "1"])
    table = capsys.readouterr().out
    assert [row["method"] for row in rows] == list(overhead.METHODS)
    for row in rows:
        assert row["step_ms"] > 0 and row["floor_ms"] > 0
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert math.isclose(row["ratio"], row["step_ms"] / row["floor_ms"])
        assert 0 < row["optimizer_ms"] < row["step_ms"]  # a part of the step, timed alone
        assert (f"| {row['method']} | {row['step_ms']:.1f} | {row['floor_ms']:.1f} | {row['ratio']:.3f} "
                f"| {row['optimizer_ms']:.1f} |") in table
    assert "batch 8, 32 px" in table and "1 threads" in table


def test_quality_smoke_scores_are_percentages(tmp_path):
    quality = load("quality")
    rows = quality.main(["--smoke", "--methods", "moco", "--output-dir", str(tmp_path)])
    assert [row[0] for row in rows] == ["random init", "moco"]
    for _, _, _, knns, linears in rows:  # one figure per seed
        assert len(knns) == len(linears) == 1 and all(0 <= x <= 100 for x in knns + linears)
    assert (tmp_path / "moco" / "seed0" / "checkpoint.pth.tar").is_file()
    assert quality.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
