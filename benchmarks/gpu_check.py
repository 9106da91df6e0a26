"""One-command GPU check: each method's real script trains briefly under torchrun; one markdown table.

On a CUDA machine, for each method, the script's own main() runs under `torchrun --standalone
--nproc_per_node=1` (so the NCCL process group, DDP, pinned memory, cudnn autotuning and, for SimCLR, BYOL
and SimSiam, SyncBN are on the path) for --steps steps of ResNet-50 at 224 px, global batch 128, on
`--data synthetic:N` (N = steps × batch: one epoch), in three settings:

    fp32      the scripts' defaults (convolutions in TF32, torch's default on Ampere and later)
    amp       --amp --channels-last
    compile   --amp --channels-last --compile

A run passes when it ends without error, its last loss is finite, and its checkpoint is read by
torch.load(weights_only=True), has no `_orig_mod.` key, and loads through linear_eval.load_backbone (what
`linear_eval.py --pretrained` does). Measured per run, over the steps after --warmup (cudnn autotuning,
compilation): the GPU time of a step (CUDA events recorded when the loop receives a batch and when it asks
for the next one: the step's work, without the wait for data), its median as ms/step and images/s, the
end-to-end images/s (data waits included: whether -j workers keep up), and the peak memory
(torch.cuda.max_memory_allocated). The floor beside each is a plain supervised torchvision step
(forward, cross-entropy, backward, SGD) and a forward without grad, on random tensors already on the device,
with the same flags, times the passes the method needs (as benchmarks/overhead.py counts them): MoCo 1 step +
1 forward (keys), SimCLR 2 steps (its one pass over the 2N views is counted as two passes over N), BYOL 2
steps + 2 forwards (target), SimSiam 2 steps, InsDis 1 step, CMC 2 steps (its 1- and 2-channel encoders
counted as 3-channel ones). ratio = ms/step ÷ floor ms; issue 14's goals: a ratio ≤ 1.05 (a step costs at
most 1.05× its backbone passes), and images/s within 10 % of supervised ÷ passes (a ratio ≤ 1.11).

Time budget (under 8 minutes on one H200; estimated, not yet measured: no GPU has been lent to this
project): one torchrun process runs all 18 trainings and the floors, so CUDA starts once (each main() still
creates and destroys its NCCL group, as a launched script does). A run costs
~5-10 s of set-up (process group, two ResNet-50s, 12 loader workers, cudnn autotuning, a checkpoint of
0.2-0.4 GB and its load check) plus 30 steps of 0.1-0.4 s (SimCLR and BYOL make two 224 px views with blur per
image: ~0.3 s a step from 12 PIL workers); ~4 minutes for the fp32 and amp rows. A compile row adds inductor's
compilation of each encoder (forward+backward, and the no-grad forward of MoCo's keys and BYOL's target: ~1
minute cold, less once its kernel cache is warm). The worker starts a run only if its estimate (the longest
run of its kind so far) ends within --budget-s (420 s); the launcher stops everything at --budget-s + 40 s.
A row that did not fit says so: rerun it alone with --methods M --settings compile.

    python benchmarks/gpu_check.py                              # all methods, all settings, one GPU
    python benchmarks/gpu_check.py --methods moco byol --settings amp compile --steps 50
    python benchmarks/gpu_check.py --smoke                      # CPU, gloo, resnet18, 16 px, 2 steps, fp32: runs everything
"""
import argparse
import datetime
import importlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.models as models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402

SETTINGS = {"fp32": [], "amp": ["--amp", "--channels-last"], "compile": ["--amp", "--channels-last", "--compile"]}
# backbone passes per step: (supervised steps, forwards without grad)
PASSES = {"moco": (1, 1), "simclr": (2, 0), "byol": (2, 2), "simsiam": (2, 0), "insdis": (1, 0), "cmc": (2, 0)}
NCE_K = 4096  # InsDis/CMC noise samples, capped at half the bank (one row per image) of these short runs


def method_flags(method: str, images: int) -> list:
    """Flags beyond the paper defaults that a one-epoch run needs: the real lr from the first step (no warm-up
    at lr 0), and K below the bank size."""
    if method in ("simclr", "byol"):
        return ["--warmup-epochs", "0"]
    if method in ("insdis", "cmc"):
        return ["--nce-k", str(min(NCE_K, images // 2))]
    return []


# ------------------------------------------------------------------------------------------ worker
class Clock:
    """Marks on the device's timeline (CUDA events) or the host's clock (CPU, synchronous); ms between two."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        if not self.cuda:
            return 1000 * (end - start)
        end.synchronize()
        return start.elapsed_time(end)


def timed_loaders(clock: Clock, steps: list):
    """common.build_loader, patched: a training loader marks when the loop receives a batch and when it asks
    for the next, so (start, end) of each step is its work without the wait for data."""
    build = common.build_loader

    class TimedLoader(torch.utils.data.DataLoader):
        def __iter__(self):
            for batch in super().__iter__():
                start = clock.mark()
                yield batch
                steps.append((start, clock.mark()))

    def build_loader(*args, **kwargs):
        loader = build(*args, **kwargs)
        if kwargs.get("train", args[5] if len(args) > 5 else True):
            loader.__class__ = TimedLoader
        return loader
    return build_loader


def run_method(method: str, setting: str, args, device, folder: str) -> dict:
    """One short training through the script's main(), as torchrun launched it; then the checks."""
    import linear_eval
    module = importlib.import_module(method)
    images = args.steps * args.batch_size
    out = os.path.join(folder, f"{method}-{setting}")
    argv = ["--data", f"synthetic:{images}", "-a", args.arch, "-b", str(args.batch_size), "--image-size",
            str(args.image_size), "--epochs", "1", "-j", str(args.workers), "--knn-every", "0", "--output-dir", out,
            *method_flags(method, images), *SETTINGS[setting]]
    clock, steps, losses = Clock(device), [], []
    display = common.ProgressMeter.display

    def record(meter, batch):  # the Loss meter's running average at each progress line
        losses.extend(m.avg for m in meter.meters if m.name == "Loss")
        display(meter, batch)

    patches = [(common, "build_loader", timed_loaders(clock, steps)), (common.ProgressMeter, "display", record)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    torch.compiler.reset()  # each compile row compiles from scratch, as a new run would
    if device.type == "cuda":
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats(device)
    row = {"method": method, "setting": setting, "steps": 0, "error": ""}
    start = time.time()
    try:
        module.main(argv)
    except SystemExit as stop:  # the scripts' one-line errors (NaN loss, ...)
        row["error"] = str(stop.code)
    except Exception as err:  # noqa: BLE001: a failed row, the other rows still run
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        if dist.is_initialized():  # a failed run leaves its group behind
            dist.destroy_process_group()
    row["seconds"] = time.time() - start
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    timed = steps[args.warmup:]
    if timed:
        per_step = [clock.ms(a, b) for a, b in timed]
        row["steps"], row["step_ms"] = len(steps), statistics.median(per_step)
        row["images_per_s"] = 1000 * args.batch_size / row["step_ms"]
        row["end_to_end_images_per_s"] = 1000 * args.batch_size * len(timed) / clock.ms(timed[0][0], timed[-1][1])
    row["loss"] = losses[-1] if losses else float("nan")
    if not row["error"] and not math.isfinite(row["loss"]):
        row["error"] = f"loss {row['loss']}"
    row["checkpoint"] = check_checkpoint(os.path.join(out, "checkpoint.pth.tar"), linear_eval) if not row["error"] else "-"
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def check_checkpoint(path: str, linear_eval) -> str:
    """'loads' when a weights-only torch.load reads it, no key says `_orig_mod.`, and --pretrained loads it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if any("_orig_mod." in key for key in ckpt["state_dict"]):
            return "keys with _orig_mod."
        linear_eval.load_backbone(path, None, "auto", log=lambda line: None)
        return "loads"
    except (Exception, SystemExit) as err:  # noqa: BLE001: linear_eval's fail() is a SystemExit
        return f"fails: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"


def run_floor(setting: str, args, device) -> dict:
    """The supervised unit: a torchvision step (forward, cross-entropy, backward, SGD) and a forward without
    grad in train mode (as MoCo's keys and BYOL's target), on one batch already on the device; medians."""
    flags = SETTINGS[setting]
    torch.compiler.reset()
    torch.manual_seed(0)
    net = models.__dict__[args.arch](num_classes=1000).to(device).train()
    if "--channels-last" in flags:
        net = net.to(memory_format=torch.channels_last)
    if "--compile" in flags:
        net.compile()
    optimizer = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled="--amp" in flags)

    def train_step():
        with amp:
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward():
        with torch.no_grad(), amp:
            net(x)

    clock, row, start = Clock(device), {"method": "supervised", "setting": setting, "error": ""}, time.time()
    try:
        for name, fn in (("step_ms", train_step), ("forward_ms", forward)):
            for _ in range(args.warmup):
                fn()
            times = []
            for _ in range(max(args.steps - args.warmup, 1)):
                a = clock.mark()
                fn()
                times.append(clock.ms(a, clock.mark()))
            row[name] = statistics.median(times)
        row["images_per_s"] = 1000 * args.batch_size / row["step_ms"]
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    row["seconds"] = time.time() - start
    return row


def plan(args) -> list:
    """(kind, method, setting) in the order that keeps the cheap rows first: a compile row that does not fit
    the budget then costs no other row."""
    runs = []
    for setting in args.settings:
        runs.append(("floor", "supervised", setting))
        runs += [("method", method, setting) for method in args.methods]
    return runs


def worker(args):
    """Inside torchrun: every run of the plan, one JSON line each in --worker's file as it ends."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    folder = args.output_dir or tempfile.mkdtemp(prefix="gpu_check_")
    longest = {}  # (kind, compiled) -> seconds of the longest such run so far: the estimate of the next
    for kind, method, setting in plan(args):
        key = (kind, setting == "compile")
        guess = longest.get(key, longest.get((kind, False), 0) * (3 if setting == "compile" else 1))
        if time.time() + guess > args.deadline:
            row = {"method": method, "setting": setting, "error": "skipped: over --budget-s"}
        elif kind == "floor":
            row = run_floor(setting, args, device)
        else:
            row = run_method(method, setting, args, device, folder)
        longest[key] = max(longest.get(key, 0), row.get("seconds", 0))
        with open(args.worker, "a") as f:
            f.write(json.dumps(row) + "\n")
    if not args.output_dir:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ launcher
def table(rows: list, args, device_name: str) -> str:
    floors = {r["setting"]: r for r in rows if r["method"] == "supervised" and not r["error"]}
    lines = [f"{datetime.date.today()}, {device_name}, torch {torch.__version__}, -a {args.arch}, global batch "
             f"{args.batch_size}, {args.image_size} px, {args.steps} steps ({args.warmup} untimed), torchrun "
             f"--nproc_per_node=1, -j {args.workers}", "",
             "| method | setting | ms/step | images/s | end-to-end images/s | floor ms | ratio | peak GiB | loss "
             "| checkpoint |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['method']} | {r['setting']} | {r['error']} | | | | | | | |")
        elif r["method"] == "supervised":
            lines.append(f"| supervised step (forward {r['forward_ms']:.1f} ms) | {r['setting']} | {r['step_ms']:.1f} "
                         f"| {r['images_per_s']:.0f} | | | | | | |")
        else:
            floor = floors.get(r["setting"])
            if floor:
                steps, forwards = PASSES[r["method"]]
                r["floor_ms"] = steps * floor["step_ms"] + forwards * floor["forward_ms"]
                r["ratio"] = r["step_ms"] / r["floor_ms"]
            peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.1f}"  # CPU: no allocator statistics
            lines.append(f"| {r['method']} | {r['setting']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} "
                         f"| {r['end_to_end_images_per_s']:.0f} | {r.get('floor_ms', float('nan')):.1f} "
                         f"| {r.get('ratio', float('nan')):.2f} | {peak} | {r['loss']:.3f} "
                         f"| {r['checkpoint']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--settings", nargs="*", default=None, choices=list(SETTINGS),
                        help="default: all three (with --smoke: fp32)")
    parser.add_argument("-a", "--arch", default="resnet50")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="global batch (one process)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (one epoch)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left untimed (autotuning, compilation)")
    parser.add_argument("-j", "--workers", type=int, default=min(12, max((os.cpu_count() or 2) - 2, 0)),
                        help="loader workers of each run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the runs")
    parser.add_argument("--budget-s", type=float, default=420, help="no run starts that would end after this")
    parser.add_argument("--output-dir", default="", help="keep the log and results here (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep each run's checkpoint")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, resnet18, 16 px, batch 8, 2 steps, fp32: checks that everything runs")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # set by the launcher inside torchrun
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.arch, args.batch_size, args.image_size, args.steps, args.warmup = "resnet18", 8, 16, 2, 0
        args.workers, args.threads = 0, args.threads or 1
        # bf16 on a CPU without bf16 units takes ~10 s a step (tests/test_amp.py runs it), compiling minutes
        # (tests/test_compile.py): ask for them with --settings
        args.settings = args.settings or ["fp32"]
    args.settings = args.settings or list(SETTINGS)
    if args.steps <= args.warmup and not args.smoke:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device; on a CPU run --smoke")
    folder = args.output_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(folder, exist_ok=True)
    results, log = os.path.join(folder, "results.jsonl"), os.path.join(folder, "gpu_check.log")
    open(results, "w").close()
    given = list(argv if argv is not None else sys.argv[1:])  # the worker gets them all but --output-dir
    forward = [a for i, a in enumerate(given) if a != "--output-dir" and (i == 0 or given[i - 1] != "--output-dir")
               and not a.startswith("--output-dir=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.abspath(__file__), *forward, "--output-dir", os.path.join(folder, "runs"),
               "--worker", results, "--deadline", str(time.time() + args.budget_s)]
    start, done, killed = time.time(), 0, False
    with open(log, "w") as log_file:  # the scripts' progress lines and torch's warnings
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        while proc.poll() is None and time.time() - start < args.budget_s + 40:
            time.sleep(0.5)
            done = report(results, done)
        if proc.poll() is None:  # past the budget: stop torchrun, its worker and their loader workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
    report(results, done)
    with open(results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ran = {(r["method"], r["setting"]) for r in rows}
    why = "stopped at --budget-s + 40 s" if killed else f"the worker exited with status {proc.returncode}"
    rows += [{"method": m, "setting": s, "error": f"not run: {why}"} for _, m, s in plan(args) if (m, s) not in ran]
    if proc.returncode and not killed:
        print(f"gpu_check.py: the worker exited with status {proc.returncode}; its log: {log}", file=sys.stderr)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else (
        f"cpu ({platform.processor() or platform.machine()})")
    print(f"\n{table(rows, args, device_name)}\n\n({time.time() - start:.0f} s in all; log and results in {folder})")
    if not args.output_dir:
        shutil.rmtree(os.path.join(folder, "runs"), ignore_errors=True)
    return rows


def report(results: str, done: int) -> int:
    """One status line on stderr for each run that has ended since the last call."""
    with open(results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows[done:]:
        status = r["error"] or f"{r.get('step_ms', float('nan')):.1f} ms/step, {r.get('seconds', 0):.0f} s"
        print(f"{r['method']} {r['setting']}: {status}", file=sys.stderr, flush=True)
    return len(rows)


if __name__ == "__main__":
    main()
