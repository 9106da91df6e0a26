"""The benchmarks run end to end in smoke mode and report sane numbers (no timing thresholds)."""
import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import time
import types

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
    assert "batch 8, 16 px" in table and "1 threads" in table


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


def test_gpu_check_starts_no_run_past_its_budget_and_needs_cuda_without_smoke(tmp_path, one_thread):
    """The worker as torchrun starts it, in this process, its deadline already past: every row of the plan is
    skipped and the table says so; without --smoke and without CUDA the launcher refuses in one line."""
    gpu_check = load("gpu_check")
    results = tmp_path / "results.jsonl"
    args = gpu_check.parse_args(["--smoke", "--worker", str(results), "--deadline", str(time.time() - 1)])
    gpu_check.worker(args)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["method"], r["setting"]) for r in rows] == [("supervised", "fp32")] + [
        (m, "fp32") for m in gpu_check.PASSES]
    assert all(r["error"] == "skipped: over --budget-s" for r in rows)
    assert "| moco | fp32 | skipped: over --budget-s |" in gpu_check.table(rows, args, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device; on a CPU run --smoke"):
            gpu_check.main([])


class SerialPool:  # concurrent.futures.ThreadPoolExecutor's map, in the calling (main) thread
    def __init__(self, max_workers):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


@pytest.mark.slow  # trains (tiny runs), in this process
def test_quality_smoke_scores_are_percentages(tmp_path, monkeypatch, one_thread):
    """quality.py end to end, each script's command line run as main(argv) in this process with its printed lines
    captured (four interpreter starts saved; the command-line guard itself is tests/test_scaffold.py's)."""
    quality = load("quality")
    commands = []

    def run(cmd, log, threads):
        commands.append(cmd[0])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            importlib.import_module(cmd[0].removesuffix(".py")).main(cmd[1:])
        return printed.getvalue(), 1.0

    monkeypatch.setattr(quality, "run", run)
    pool = types.SimpleNamespace(futures=types.SimpleNamespace(ThreadPoolExecutor=SerialPool))
    monkeypatch.setattr(quality, "concurrent", pool)  # main() sets signal handlers: the main thread only
    rows = quality.main(["--smoke", "--methods", "moco", "--output-dir", str(tmp_path)])
    assert commands == ["linear_eval.py", "linear_eval.py", "moco.py", "linear_eval.py"]  # floor kNN, probes
    assert [row["method"] for row in rows] == ["random init", "moco"]
    for row in rows:  # one seed, one thread count: one figure each
        assert (row["seed"], row["threads"]) == (0, 1) and 0 <= row["knn"] <= 100 and 0 <= row["linear"] <= 100
    assert rows[1]["monitor"] == [rows[1]["knn"]]  # one epoch: the row's kNN is the monitor's one number
    assert (tmp_path / "synthetic" / "moco" / "seed0-t1" / "checkpoint.pth.tar").is_file()
    assert quality.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_quality_evaluates_the_floor_and_the_methods_on_one_stem(tmp_path, monkeypatch):
    """Every command of a quality run that builds a network names --stem: the floor's kNN and probe and each
    pre-training (a probe of a checkpoint takes the checkpoint's stem). Commands recorded, nothing run."""
    quality = load("quality")
    commands = []

    def run(cmd, log, threads):
        commands.append(cmd)
        if cmd[0] != "linear_eval.py":  # a pre-training: quality reads the monitor's last kNN from its log
            out = cmd[cmd.index("--output-dir") + 1]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "log.txt"), "w") as f:
                f.write(json.dumps({"epoch": 0, "knn_acc1": 50.0}) + "\n")
        return "=> kNN (k=200, T=0.07): Acc@1 10.00 Acc@5 50.00\n=> linear probe: Acc@1 20.00 Acc@5 60.00\n", 1.0

    monkeypatch.setattr(quality, "run", run)
    quality.main(["--smoke", "--output-dir", str(tmp_path)])
    assert len(commands) == 2 + 2 * len(quality.METHODS)
    for cmd in commands:
        if "--pretrained" not in cmd:
            assert "--stem" in cmd and cmd[cmd.index("--stem") + 1] == "imagenet", " ".join(cmd)


def test_every_scripts_cpu_command_is_its_row_of_the_quality_table():
    """The command in each script's docstring and on its page in docs/ is what benchmarks/quality.py runs."""
    quality = load("quality")
    defaults = argparse.Namespace(data="synthetic:2500", arch="resnet18", batch_size=64, epochs=None, stem="imagenet",
                                  workers=2, smoke=False)  # quality.py's
    for method, flags in quality.METHODS.items():
        module = importlib.import_module(method)
        line = next(l for l in module.__doc__.splitlines() if l.strip().startswith(f"python {method}.py --data synthetic"))
        command = " ".join(line.split("#")[0].split())  # the docstring continues the line with a backslash
        assert command in (ROOT / "docs" / f"{method}.md").read_text(), method
        assert command == " ".join(["python", *quality.command(method, defaults, 0)]), method
        args = module.parse_args(command.split()[2:])
        assert command.endswith(" ".join(flags)), method
        assert (args.data, args.arch, args.batch_size, args.epochs, args.stem, args.seed) == (
            "synthetic:2500", "resnet18", 64, quality.LONGER.get(method, quality.EPOCHS), "imagenet", 0)
        assert args.knn_every == 1  # the monitor is on: the table's kNN column is its last number


def test_quality_rejects_a_bad_epoch_count_in_one_line(capsys):
    quality = load("quality")
    with pytest.raises(SystemExit) as err:
        quality.main(["--epochs", "0"])
    assert err.value.code == 2 and "argument --epochs: must be >= 1 (got 0)" in capsys.readouterr().err
