"""Decode + augmentation throughput per CPU core of each method's training pipeline, and the cores a GPU needs.

ImageNet-size JPEGs (500×375, quality 90: smooth colour fields with an edge, texture and grain, ~105 KB
each; ImageNet's training JPEGs average ~110 KB, 138 GB over 1.28 M files) are generated into a temporary
image folder. For each method, the script's own
`build_transform(args)` at 224 px (its paper defaults; MoCo also with `--aug-plus`) runs on them exactly as
one DataLoader worker runs it: read the file, decode with Pillow (common.load_image), make every view.

One thread (torch.set_num_threads(1), as in a loader worker), timed in CPU seconds of this process
(time.process_time), so that other jobs sharing the core do not count; under `taskset -c 0` it also stays
on one core. images/s per core = images / CPU seconds, the median of --reps passes over the folder after
one untimed pass.

Cores per GPU = (GPU images/s of the method) / (images/s per core), the GPU images/s being a supervised
ResNet-50 training step rate (--gpu-rate) divided by the backbone passes the method needs, counted in
supervised steps (forward+backward = 1, a forward without grad = 1/3, backward costing about two forwards):
MoCo 1 + 1/3 (queries, keys), SimCLR 2 (one pass of the 2N views), BYOL 2 + 2/3 (online per view, target
per view), SimSiam 2, InsDis 1, CMC 2 (its L and ab encoders; a little less, their stems see 1 and 2
channels). The default --gpu-rate, 2470 images/s, is published: NVIDIA DeepLearningExamples,
PyTorch/Classification/ConvNets/resnet50v1.5/README.md (commit 291f0d0), "Training performance: NVIDIA
DGX A100 (8x A100 80GB)", 1 GPU, mixed precision, pytorch-21.03 NGC container. An H100/H200 steps faster,
so it needs more cores than this; pass the rate benchmarks/gpu_check.py measures once one has been lent.

    taskset -c 0 python benchmarks/data.py                  # all methods, 50 images, 5 timed passes
    taskset -c 0 python benchmarks/data.py --methods simclr byol --images 100
    python benchmarks/data.py --gpu-rate 3100               # cores per GPU at a measured step rate
    python benchmarks/data.py --smoke                       # seconds: checks that everything runs
"""
import argparse
import datetime
import importlib
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402

METHODS = {  # row -> (script, extra flags)
    "moco": ("moco", []), "moco v2": ("moco", ["--aug-plus"]), "simclr": ("simclr", []), "byol": ("byol", []),
    "simsiam": ("simsiam", []), "insdis": ("insdis", []), "cmc": ("cmc", []),
}
PASSES = {"moco": 1 + 1 / 3, "simclr": 2, "byol": 2 + 2 / 3, "simsiam": 2, "insdis": 1, "cmc": 2}  # supervised steps
PUBLISHED_RATE = 2470  # images/s, ResNet-50 v1.5, 1× A100 80GB, AMP (NVIDIA DeepLearningExamples, see the docstring)


def make_jpegs(folder: str, n: int, width: int = 500, height: int = 375, quality: int = 90, seed: int = 0) -> list:
    """n JPEGs that cost the codec what photographs do: a smooth colour field (low frequencies), a hard
    edge, mid-frequency texture and grain, ~105 KB each at 500×375 and quality 90 (ImageNet's mean ~110 KB)."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(folder, "train", "all"), exist_ok=True)
    paths = []
    for i in range(n):
        field = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 5, generator=g), size=(height, width),
                                                mode="bicubic", align_corners=False)[0]
        texture = torch.nn.functional.interpolate(torch.randn(1, 3, height // 2, width // 2, generator=g),
                                                  size=(height, width), mode="bilinear", align_corners=False)[0]
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        a, b, c = (torch.rand(3, generator=g) - 0.5) * torch.tensor([2.0, 2.0, width])
        edge = (a * xx + b * yy + c > width / 4).float()  # one straight boundary between two regions
        img = field * (0.6 + 0.4 * edge) + 0.15 * texture + 0.04 * torch.randn(3, height, width, generator=g)
        pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        path = os.path.join(folder, "train", "all", f"{i:04d}.jpg")
        Image.fromarray(pixels).save(path, quality=quality)
        paths.append(path)
    return paths


def pipeline(row: str, image_size: int):
    """(read, transform) of one method's training pipeline, as its DataLoader worker runs it."""
    script, flags = METHODS[row]
    module = importlib.import_module(script)
    transform = module.build_transform(module.parse_args(["--data", "folder", "--image-size", str(image_size), *flags]))
    return common.load_image, transform


def images_per_second(pipelines: dict, paths: list, reps: int) -> dict:
    """name -> images per CPU second for read + decode + all views: the median over `reps` passes of each
    (read, transform) pipeline, interleaved (pass of a, pass of b, ...) after one untimed pass of each."""
    def one_pass(read, transform):
        start = time.process_time()
        for path in paths:
            transform(read(path))
        return time.process_time() - start

    torch.manual_seed(0), random.seed(0)
    for read, transform in pipelines.values():  # first touches: page cache, allocator, lazy imports
        one_pass(read, transform)
    seconds = {name: [] for name in pipelines}
    for _ in range(reps):
        for name, (read, transform) in pipelines.items():
            seconds[name].append(one_pass(read, transform))
    return {name: len(paths) / statistics.median(times) for name, times in seconds.items()}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--images", type=int, default=50, help="JPEGs generated and timed per pass")
    parser.add_argument("--reps", type=int, default=5, help="timed passes per pipeline (median)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size of the pipelines")
    parser.add_argument("--gpu-rate", type=float, default=PUBLISHED_RATE,
                        help="supervised ResNet-50 training images/s of one GPU (default: published A100 AMP rate)")
    parser.add_argument("--smoke", action="store_true", help="4 images, 1 timed pass: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.reps = 4, 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: a DataLoader worker runs its transforms on one thread too
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            paths = make_jpegs(folder, args.images)
            kb = statistics.mean(os.path.getsize(p) for p in paths) / 1000
            rates = images_per_second({"decode": (common.load_image, lambda x: x),  # the decode alone
                                       **{row: pipeline(row, args.image_size) for row in args.methods}}, paths, args.reps)
            for row in args.methods:
                gpu = args.gpu_rate / PASSES[METHODS[row][0]]  # images/s the GPU takes of this method
                rows.append({"method": row, "pil": rates[row], "gpu_images_per_s": gpu, "cores": gpu / rates[row]})
    finally:  # main() may run inside another process (the tests)
        torch.set_num_threads(threads)

    cpu = platform.processor() or platform.machine()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{datetime.date.today()}, {cpu}, {affinity} core(s) allowed, 1 thread, torch {torch.__version__}, "
          f"{args.images} JPEGs 500×375 q90 ({kb:.0f} KB mean), {args.image_size} px crops, {args.reps} passes "
          f"(median, CPU time); GPU {args.gpu_rate:.0f} supervised images/s\n")
    print(f"decode only: {rates['decode']:.1f} images/s per core\n")
    print("| method | images/s per core | GPU images/s | cores per GPU |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['pil']:.1f} | {r['gpu_images_per_s']:.0f} | {r['cores']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
