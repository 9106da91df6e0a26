"""Representation quality per method for the same image budget, on `--data synthetic`.

Every method pre-trains a ResNet-18 for the same number of epochs (the same images seen), then
the same weighted kNN (k=200, T=0.07) and the same linear probe evaluate its backbone, and a
randomly initialised backbone as the floor. Prints a markdown table (README.md carries it).

    python benchmarks/quality.py                       # all methods, ~25 min on 2 CPU cores
    python benchmarks/quality.py --methods moco simsiam --epochs 4
    python benchmarks/quality.py --smoke               # seconds: checks that the pipeline runs

Per-method flags adapt each paper's recipe to a 5000-image, 32 px, few-epoch run (what differs is
listed in the table); everything else is the script's default.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # short-run adaptations, all at global batch 128
    "moco": ["--moco-k", "512", "--moco-m", "0.99", "--mlp", "--moco-t", "0.2", "--aug-plus", "--cos",
             "--bn-splits", "8", "--lr", "0.06"],
    "simclr": ["--temperature", "0.5", "--warmup-epochs", "1"],
    "byol": ["--warmup-epochs", "1", "--tau-base", "0.99"],
    "simsiam": ["--fix-pred-lr"],
    "insdis": ["--nce-k", "512", "--softmax"],
    "cmc": ["--nce-k", "512", "--softmax"],
}


def run(cmd, log):
    start = time.time()
    proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"quality.py: {' '.join(cmd)} failed:\n{proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout, time.time() - start


def evaluate(pretrained, args, out_dir):
    out_dir = os.path.abspath(out_dir)
    common = ["linear_eval.py", "--data", args.data, "-a", args.arch, "-j", str(args.workers), "--seed", "0"]
    if pretrained:
        common += ["--pretrained", pretrained]
    stdout, _ = run(common + ["--knn"], os.path.join(out_dir, "eval.log"))
    knn = float(stdout.split("=> kNN")[1].split("Acc@1")[1].split()[0])
    stdout, _ = run(common + ["--epochs", str(args.probe_epochs), "-b", "256", "--lr", str(args.probe_lr),
                              "--cos", "--output-dir", os.path.join(out_dir, "probe")], os.path.join(out_dir, "eval.log"))
    linear = float(stdout.split("=> linear probe: Acc@1")[1].split()[0])
    return knn, linear


def main(argv=None):
    parser = argparse.ArgumentParser(prog="quality.py", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("-a", "--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, default=8, help="pre-training epochs, the same for every method")
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--probe-lr", type=float, default=0.1, help="the same probe for all (MoCo's lr 30 diverges on a random encoder)")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="global pre-training batch, every method")
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--output-dir", default="./runs/quality")
    parser.add_argument("--smoke", action="store_true", help="tiny data and one epoch: checks the pipeline only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.epochs, args.probe_epochs, args.workers, args.batch_size = "synthetic:256", 1, 1, 0, 32
    args.output_dir = os.path.abspath(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)

    rows = []
    knn, linear = evaluate("", args, os.path.join(args.output_dir, "random"))
    rows.append(("random init", "–", "–", knn, linear))
    for method in args.methods:
        out_dir = os.path.abspath(os.path.join(args.output_dir, method))
        flags = METHODS[method]
        if args.smoke:  # K must stay below the 256-image bank and divide by the batch
            flags = [("64" if prev in ("--moco-k", "--nce-k") else f) for prev, f in zip([""] + flags, flags)]
        _, seconds = run([f"{method}.py", "--data", args.data, "-a", args.arch, "-b", str(args.batch_size), "--epochs",
                          str(args.epochs), "-j", str(args.workers), "--seed", "0", "-p", "1000",
                          "--output-dir", out_dir, *flags], os.path.join(args.output_dir, f"{method}.log"))
        knn, linear = evaluate(os.path.join(out_dir, "checkpoint.pth.tar"), args, out_dir)
        rows.append((method, f"{seconds:.0f}", " ".join(flags), knn, linear))
        print(f"{method}: {seconds:.0f} s, kNN {knn:.1f}, linear {linear:.1f}", file=sys.stderr, flush=True)

    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"--data {args.data}, -a {args.arch}, batch {args.batch_size}, {args.epochs} epochs each; "
          f"kNN k=200 T=0.07; linear probe {args.probe_epochs} epochs, lr {args.probe_lr}, cosine\n")
    print("| method | pre-train s | flags | kNN top-1 | linear top-1 |\n| --- | ---: | --- | ---: | ---: |")
    for method, seconds, flags, knn, linear in rows:
        print(f"| {method} | {seconds} | `{flags}` | {knn:.1f} | {linear:.1f} |" if flags != "–" else
              f"| {method} | {seconds} | {flags} | {knn:.1f} | {linear:.1f} |")
    with open(os.path.join(args.output_dir, "quality.json"), "w") as f:
        json.dump(rows, f)
    return rows


if __name__ == "__main__":
    main()
