"""The benchmarks run end to end in smoke mode and report sane numbers (no timing thresholds)."""
import importlib.util
import math

import pytest
import torch

from conftest import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
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


def test_data_smoke_gives_images_per_core_and_cores_per_gpu(capsys):
    data = load("data")
    rows = data.main(["--smoke"])
    table = capsys.readouterr().out
    assert [row["method"] for row in rows] == list(data.METHODS)
    for row in rows:
        gpu = data.PUBLISHED_RATE / data.PASSES[data.METHODS[row["method"]][0]]  # supervised rate / passes
        assert row["pil"] > 0 and math.isclose(row["cores"], gpu / row["pil"])
        assert f"| {row['method']} | {row['pil']:.1f} | {gpu:.0f} | {row['cores']:.1f} |" in table
    assert "4 JPEGs 500×375 q90" in table and "1 thread" in table


@pytest.mark.slow  # ~50 s on 2 shared cores: torchrun, then six short trainings and their checks
def test_gpu_check_smoke_trains_every_method_under_torchrun_and_loads_its_checkpoint(tmp_path, capsys):
    gpu_check = load("gpu_check")
    rows = gpu_check.main(["--smoke", "--output-dir", str(tmp_path)])
    table = capsys.readouterr().out
    assert [(r["method"], r["setting"]) for r in rows] == [("supervised", "fp32")] + [(m, "fp32") for m in gpu_check.PASSES]
    floor = rows[0]
    assert floor["error"] == "" and 0 < floor["forward_ms"] < floor["step_ms"]
    for r in rows[1:]:
        assert r["error"] == "" and r["checkpoint"] == "loads" and math.isfinite(r["loss"]), r
        assert r["steps"] == 2 and r["step_ms"] > 0 and r["end_to_end_images_per_s"] > 0
        steps, forwards = gpu_check.PASSES[r["method"]]  # the floor: supervised steps and forwards the method needs
        assert math.isclose(r["floor_ms"], steps * floor["step_ms"] + forwards * floor["forward_ms"])
        assert f"| {r['method']} | fp32 | {r['step_ms']:.1f} | {r['images_per_s']:.0f} |" in table
    assert "torchrun --nproc_per_node=1" in table and "global batch 8, 16 px, 2 steps" in table
    assert (tmp_path / "results.jsonl").is_file() and (tmp_path / "gpu_check.log").is_file()


def test_gpu_check_starts_no_run_past_its_budget_and_needs_cuda_without_smoke(tmp_path, capsys):
    gpu_check = load("gpu_check")
    rows = gpu_check.main(["--smoke", "--budget-s", "0", "--output-dir", str(tmp_path)])
    assert rows and all(r["error"] == "skipped: over --budget-s" for r in rows)
    assert "| moco | fp32 | skipped: over --budget-s |" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device; on a CPU run --smoke"):
            gpu_check.main([])


@pytest.mark.slow
def test_quality_smoke_scores_are_percentages(tmp_path):
    quality = load("quality")
    rows = quality.main(["--smoke", "--methods", "moco", "--output-dir", str(tmp_path)])
    assert [row[0] for row in rows] == ["random init", "moco"]
    for _, _, _, knns, linears in rows:  # one figure per seed
        assert len(knns) == len(linears) == 1 and all(0 <= x <= 100 for x in knns + linears)
    assert (tmp_path / "moco" / "seed0" / "checkpoint.pth.tar").is_file()
    assert quality.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_every_scripts_cpu_command_is_its_row_of_the_quality_table():
    """The command in each script's docstring and on its page in docs/ is what benchmarks/quality.py runs."""
    quality = load("quality")
    for method, flags in quality.METHODS.items():
        module = importlib.import_module(method)
        line = next(l for l in module.__doc__.splitlines() if l.strip().startswith(f"python {method}.py --data synthetic"))
        command = line.split("#")[0].strip()
        assert command in (ROOT / "docs" / f"{method}.md").read_text(), method
        args = module.parse_args(command.split()[2:])
        assert command.endswith(" ".join(flags)), method
        assert (args.data, args.arch, args.batch_size, args.epochs, args.stem, args.seed) == (
            "synthetic:2500", "resnet18", 64, quality.LONGER.get(method, quality.EPOCHS), "imagenet", 0)
        assert args.knn_every == 1  # the monitor is on: the table's kNN column is its last number


def test_quality_rejects_a_bad_epoch_count_in_one_line(capsys):
    quality = load("quality")
    with pytest.raises(SystemExit) as err:
        quality.main(["--epochs", "0"])
    assert err.value.code == 2 and "--epochs must be >= 1 (got 0)" in capsys.readouterr().err
