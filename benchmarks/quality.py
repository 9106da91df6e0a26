"""Representation quality per method on a built-in data set (`synthetic` or `shapes`), over seeds and thread counts.

Every method pre-trains a ResNet-18 with its short-run recipe (METHODS: the command of its docstring and docs page),
then the same weighted kNN (k=200, T=0.07) and the same linear probe evaluate its backbone; a randomly initialised
backbone (BN statistics of the training images) of the same seed is the floor. A run's kNN is its monitor after the
last epoch (equal to `linear_eval.py --knn`). Each row gives min … max and mean ± std over seeds × thread counts, and
the smallest margin over the floor of the run's seed (docs/results.md carries the tables).

    python benchmarks/quality.py --jobs 2                                    # every method, seeds 0-2, 1 thread
    python benchmarks/quality.py --data shapes:2500 --threads 1 2 --jobs 2   # the second data set, 1 and 2 threads
    python benchmarks/quality.py --methods moco --seeds 0 --no-random        # one run
    python benchmarks/quality.py --smoke                                     # seconds: checks the pipeline
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 6  # 234 steps of batch 64 on 2500 images
LONGER = {"simsiam": 24, "byol": 12, "simclr": 12}  # docs/results.md, items 5-7
METHODS = {  # short-run adaptations, all at the same global batch (-b); why each flag: docs/results.md
    "moco": ["--moco-k", "512", "--moco-m", "0.99", "--mlp", "--moco-t", "0.2", "--aug-plus", "--cos",
             "--bn-splits", "2", "--queue-init", "keys"],
    "simclr": ["--temperature", "0.5", "--warmup-epochs", "1", "--lr-scaling", "sqrt", "--lr", "0.125"],
    "byol": ["--warmup-epochs", "1", "--tau-base", "0.99", "--lr", "8", "--zero-init-basic"],
    "simsiam": ["--fix-pred-lr", "--lr", "1", "--wd", "5e-4"],
    "insdis": ["--nce-k", "512", "--softmax", "--bank-init", "features"],
    "cmc": ["--nce-k", "512", "--softmax", "--bank-init", "features"],
}


def command(method: str, args, seed: int) -> list:
    """The script's command line of the quality table (the docstring's and docs page's, with --seed)."""
    flags = METHODS[method]
    if args.smoke:  # K below the 256-image bank, and a multiple of the batch
        flags = [f if prev not in ("--moco-k", "--nce-k") else "64" for prev, f in zip([""] + flags, flags)]
    return [f"{method}.py", "--data", args.data, "-a", args.arch, "-b", str(args.batch_size), "--epochs",
            str(args.epochs or LONGER.get(method, EPOCHS)), "--stem", args.stem, "-j", str(args.workers), "--seed",
            str(seed), *flags]


def run(cmd: list, log: str, threads: int) -> tuple:
    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(" ".join(cmd) + f"  # {threads} thread(s)\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"quality.py: {' '.join(cmd)} failed:\n{proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout, time.time() - start


def evaluate(method: str, seed: int, threads: int, args) -> dict:
    """Pre-trains (unless the floor), then the kNN top-1 and the linear probe's last-epoch top-1."""
    out_dir = os.path.join(args.output_dir, args.data.split(":")[0], method.split()[0], f"seed{seed}-t{threads}")
    probe = ["linear_eval.py", "--data", args.data, "-a", args.arch, "-j", str(args.workers), "--seed", str(seed)]
    seconds = 0.0
    if method == "random init":  # the floor: the methods' network, random weights
        probe += ["--stem", args.stem]
        stdout, _ = run(probe + ["--knn", "--output-dir", out_dir], f"{out_dir}/eval.log", threads)
        knn = float(stdout.split("=> kNN")[1].split("Acc@1")[1].split()[0])
    else:
        cmd = command(method, args, seed) + ["-p", "1000", "--knn-every", "1", "--output-dir", out_dir]
        stdout, seconds = run(cmd, f"{out_dir}/pretrain.log", threads)
        with open(os.path.join(out_dir, "log.txt")) as f:
            log = [json.loads(line) for line in f]
        knn = log[-1]["knn_acc1"]
        probe += ["--pretrained", os.path.join(out_dir, "checkpoint.pth.tar")]
    stdout, _ = run(probe + ["--epochs", str(args.probe_epochs), "-b", str(args.batch_size), "--lr", str(args.probe_lr),
                             "--cos", "--output-dir", os.path.join(out_dir, "probe")], f"{out_dir}/eval.log", threads)
    linear = float(stdout.split("=> linear probe: Acc@1")[1].split()[0])
    row = {"method": method, "seed": seed, "threads": threads, "knn": knn, "linear": linear, "seconds": seconds,
           "monitor": [entry.get("knn_acc1") for entry in log] if method != "random init" else []}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def mean_std(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def spread(values) -> str:
    (mean, std), low, high = mean_std(values), min(values), max(values)
    return f"{low:.1f} … {high:.1f} ({mean:.1f} ± {std:.1f})"


def positive_int(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {text})")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="quality.py", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--data", default="synthetic:2500", help="synthetic:N or shapes:N (N train, N/5 val images)")
    parser.add_argument("-a", "--arch", default="resnet18")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"],
                        help="imagenet: the CIFAR stem costs ~6x per image at 32 px on a CPU")
    parser.add_argument("--epochs", type=positive_int, help=f"for every method (default: {EPOCHS}, {LONGER})")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=positive_int, nargs="*", default=[1], help="torch threads of each run")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs at once (each with its --threads)")
    parser.add_argument("--probe-epochs", type=int, default=5)
    parser.add_argument("--probe-lr", type=float, default=0.1, help="one probe for all (lr 30 diverges on a random net)")
    parser.add_argument("-b", "--batch-size", type=int, default=64, help="global pre-training batch, every method")
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--output-dir", default="./runs/quality")
    parser.add_argument("--no-random", action="store_true", help="skip the random-init floor (measured already)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and one epoch: checks the pipeline only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.epochs, args.probe_epochs, args.workers, args.batch_size = "synthetic:256", 1, 1, 0, 32
        args.seeds, args.threads = args.seeds[:1], args.threads[:1]
    args.output_dir = os.path.abspath(args.output_dir)
    started = time.time()
    jobs = [("random init", seed, args.threads[0]) for seed in ([] if args.no_random else args.seeds)]
    jobs += [(method, seed, threads) for method in args.methods for seed in args.seeds for threads in args.threads]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: evaluate(*job, args), jobs))
    with open(os.path.join(args.output_dir, f"quality-{args.data.split(':')[0]}.json"), "w") as f:
        json.dump(rows, f, indent=1)

    floors = {row["seed"]: row for row in rows if row["method"] == "random init"}
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, --data "
          f"{args.data}, -a {args.arch}, {args.stem} stem, batch {args.batch_size}; seeds {args.seeds} × threads "
          f"{args.threads}; kNN k=200 T=0.07; probe {args.probe_epochs} epochs, lr {args.probe_lr}, cosine; "
          f"{(time.time() - started) / 60:.0f} min in all\n")
    print("| method | epochs | kNN top-1 | over the floor (min) | linear top-1 | pre-train min |\n"
          "| --- | ---: | --- | ---: | --- | ---: |")
    for method in dict.fromkeys(row["method"] for row in rows):
        runs = [row for row in rows if row["method"] == method]
        margin = min((r["knn"] - floors[r["seed"]]["knn"] for r in runs), default=None) if floors else None
        epochs = "–" if method == "random init" else str(args.epochs or LONGER.get(method, EPOCHS))
        minutes = sum(r["seconds"] for r in runs) / len(runs) / 60
        print(f"| {method} | {epochs} | {spread([r['knn'] for r in runs])} | "
              f"{'–' if method == 'random init' or margin is None else f'{margin:+.1f}'} | "
              f"{spread([r['linear'] for r in runs])} | {f'{minutes:.1f}' if minutes else '–'} |")
    return rows


if __name__ == "__main__":
    main()
