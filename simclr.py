"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Chen, Kornblith, Norouzi, Hinton, ICML 2020, arXiv:2002.05709.

Two augmentations of every image go through one encoder f and a small MLP head g (Sec. 2.1).
NT-Xent (Eq. 1) makes each of the 2N views pick its partner among the other 2N−1 views of the
batch: the negatives are the batch itself, no queue or memory bank, so large batches (4096) with
LARS and global BN (Sec. 2.2) and strong colour distortion plus crops (Sec. 3, App. A) make it work.
Under DDP the views of all processes are gathered with their gradient: one loss over the global batch.

    python simclr.py --data synthetic:2500 -a resnet18 -b 64 --epochs 6 --stem imagenet -j 2 --seed 0 --temperature 0.5 --warmup-epochs 1 --lr-scaling sqrt --lr 0.125  # 2 CPU cores (docs/results.md)
    torchrun --nproc_per_node=8 simclr.py --data /imagenet             # Sec. 2.3 default: batch 4096, 100 epochs
    torchrun --nnodes=4 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 simclr.py --data /imagenet

Documentation: docs/simclr.md (usage, implementation details against the official code, results, metrics).
"""
import argparse
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as models
import torchvision.transforms as transforms

import common

PROG = "simclr.py"
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",  # -a: the torchvision
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]  # builders of a ResNet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="SimCLR pre-training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")  # SCAFFOLD
    group.add_argument("data_pos", nargs="?", metavar="DATA", help="same as --data (official spelling)")
    group.add_argument("--data", help="image folder, or synthetic[:N], cifar10, cifar100, stl10")
    group.add_argument("--data-root", default="./data", help="download folder for torchvision datasets")
    group.add_argument("--image-size", type=int, default=None, help="crop size; None: 224, 32 for CIFAR/synthetic, 96 for STL-10")
    group.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process")
    group = parser.add_argument_group("model")
    group.add_argument("--stem", choices=["auto", "cifar", "imagenet"], default="auto",  # SCAFFOLD
                       help="ResNet stem; cifar: 3×3 stride-1 conv1, no max-pool; auto: cifar for crops ≤ 32 px")
    group.add_argument("-a", "--arch", default="resnet50", help="torchvision ResNet")
    group.add_argument("--proj-out-dim", type=int, default=128, help="output dimension of the head g (Sec. 2.1)")
    group = parser.add_argument_group("method")
    group.add_argument("--temperature", type=float, default=0.1, help="τ of Eq. (1); 0.1 at batch 4096 (Table 5)")
    group.add_argument("--color-jitter-strength", type=float, default=1.0, help="s: jitter (0.8s, 0.8s, 0.8s, 0.2s)")
    group.add_argument("--blur-kernel", type=float, default=0.1, help="blur kernel / image side (App. A); 0: no blur")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=100, help="epochs to train in all")
    group.add_argument("-b", "--batch-size", type=int, default=4096, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=float, default=0.3, help="base lr, scaled by --lr-scaling")
    group.add_argument("--lr-scaling", choices=["linear", "sqrt"], default="linear",
                       help="lr × batch/256 (Sec. 2.3), or lr × √batch (App. B.1: better for small batches and "
                            "short runs, with --lr 0.075)")
    group.add_argument("--momentum", type=float, default=0.9, help="optimizer momentum")
    group.add_argument("--wd", "--weight-decay", type=float, default=1e-6, help="weight decay")
    group.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up, then cosine (Sec. 2.3)")
    group = parser.add_argument_group("run")  # SCAFFOLD
    group.add_argument("--output-dir", default="./runs/simclr", help="checkpoint.pth.tar and log.txt go here")
    group.add_argument("--resume", default="", help="checkpoint path, or 'auto' for <output-dir>/checkpoint.pth.tar")
    group.add_argument("--start-epoch", type=int, default=0, help="first epoch (--resume sets it)")
    group.add_argument("--seed", type=int, default=None, help="makes a CPU run repeatable, resume included")
    group.add_argument("-p", "--print-freq", type=int, default=10, help="a progress line every N steps")
    group.add_argument("--save-every-steps", type=int, default=0,
                       help="also write the checkpoint every N steps of an epoch (0: at epoch ends and on a stop signal)")
    group.add_argument("--save-every-minutes", type=float, default=0,
                       help="also write it every M minutes (under torchrun checked every --print-freq steps; 0: off)")
    group.add_argument("--knn-every", type=int, default=None,
                       help="kNN monitor every N epochs, 0 = off; None: 1 for synthetic, CIFAR and STL-10, 0 for "
                            "image folders (each time it embeds the train and val splits, forward only)")
    group.add_argument("--knn-k", type=int, default=200, help="kNN monitor: neighbours that vote")
    group.add_argument("--knn-t", type=float, default=0.07, help="kNN monitor: vote temperature")
    group.add_argument("--amp", action="store_true", help="bf16 autocast for the encoders (CUDA; runs on CPU too, slowly); losses in float32")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convolutions")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each ResNet encoder, in place (checkpoint keys unchanged); the first steps compile")
    for gone in ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank"):
        group.add_argument(gone, action=GoneFlag, nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data = args.data or args.data_pos
    if not args.data:
        parser.error("--data is required")
    args.image_size = common.default_image_size(args.data) if args.image_size is None else args.image_size
    args.stem = ("cifar" if args.image_size <= 32 else "imagenet") if args.stem == "auto" else args.stem
    if args.knn_every is None:
        args.knn_every = int(args.data.split(":")[0] in ("synthetic", "cifar10", "cifar100", "stl10"))
    if args.knn_every < 0 or args.knn_k < 1 or args.knn_t <= 0:  # SCAFFOLD
        parser.error(f"the kNN monitor needs --knn-every >= 0, --knn-k >= 1 and --knn-t > 0 (got "
                     f"{args.knn_every}, {args.knn_k}, {args.knn_t})")
    check_ranges(parser, args, [  # SCAFFOLD: ResNets run at any crop ≥ 1 px with either stem (measured)
        ("-b/--batch-size", args.batch_size >= 1, ">= 1"),
        ("--epochs", args.epochs >= 1, ">= 1"),
        ("--start-epoch", 0 <= args.start_epoch < args.epochs, "in [0, --epochs)"),
        ("--lr", args.lr > 0, "> 0"),
        ("--momentum", 0 <= args.momentum <= 1, "in [0, 1]"),
        ("--wd", args.wd >= 0, ">= 0"),
        ("-j/--workers", args.workers >= 0, ">= 0"),
        ("-p/--print-freq", args.print_freq >= 1, ">= 1"),
        ("--save-every-steps", args.save_every_steps >= 0, ">= 0 (0: off)"),
        ("--save-every-minutes", args.save_every_minutes >= 0, ">= 0 (0: off)"),
        ("--image-size", args.image_size >= 1, ">= 1"),
        ("-a/--arch", args.arch in RESNETS, "a torchvision ResNet: " + ", ".join(RESNETS)),
    ])
    check_ranges(parser, args, [  # METHOD
        ("--temperature", args.temperature > 0, "> 0"),
        ("--proj-out-dim", args.proj_out_dim >= 1, ">= 1"),
        ("--color-jitter-strength", 0 <= args.color_jitter_strength <= 2.5, "in [0, 2.5] (hue jitter 0.2·s ≤ 0.5)"),
        ("--blur-kernel", 0 <= args.blur_kernel <= 1, "in [0, 1] (a fraction of the image side)"),
        ("--warmup-epochs", args.warmup_epochs >= 0, ">= 0"),
    ])
    return args


class GoneFlag(argparse.Action):  # SCAFFOLD
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is gone: launch with torchrun (see the docstring)")


def check_ranges(parser, args, checks):  # SCAFFOLD
    """(flag, ok, accepted range): the first flag out of its range is one argparse error line."""
    for flag, ok, accepted in checks:
        if not ok:  # the value: args.<the long flag's name>
            parser.error(f"{flag} must be {accepted} (got {getattr(args, flag.split('--')[-1].replace('-', '_'))})")


# ------------------------------------------------------------------------------------------ METHOD
class SimCLR(nn.Module):
    """f (the ResNet) and g (its `fc`, Sec. 2.1): z = g(h) = W2·σ(W1·h), hidden width = width of h
    (2048-2048-128 for ResNet-50). After pre-training g is thrown away and h is the representation."""

    def __init__(self, base_encoder, dim: int = 128):
        super().__init__()
        # γ = 0 in the last BN of every residual block, so each block starts as the identity: the
        # official resnet.py (google-research/simclr@383d414, l. 395 and 480: init_zero=True)
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        hidden = self.encoder.fc.in_features
        self.encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), self.encoder.fc)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Both views in one pass, so BN normalises over all 2N views as in the official code."""
        z = self.encoder(torch.cat([x1, x2]))  # 2n×dim
        return z.chunk(2)


class GatherLayer(torch.autograd.Function):
    """All-gather that keeps the gradient. Forward: every rank gets the W·n×d rows of all ranks.
    Backward: every rank's loss has a gradient for every rank's rows (as candidates); the all-reduce
    sum hands rank r the sum over all losses for its own rows. With the global loss L the mean of the
    ranks' losses (each a mean over the rank's own anchors), rank r's embeddings then get W·∂L/∂z_r,
    and DDP's 1/W gradient average makes the parameter gradient ∂L/∂θ, as one process holding the
    global batch would compute it. Without the gradient, rank r would miss the other ranks' terms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows with gradient, rank order; the input itself when there is no process group."""
    return GatherLayer.apply(x) if dist.is_initialized() else x


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float):
    """Eq. (1): ℓ(i,j) = −log exp(sim(z_i,z_j)/τ) / Σ_{k≠i} exp(sim(z_i,z_k)/τ), sim = cosine, over
    the 2N views of the global batch; the 2N−2 views of other images are the negatives. Scale as the
    official code, not Alg. 1 (which averages over the 2N anchors): loss_a + loss_b of objective.py
    (google-research/simclr@383d414, add_contrastive_loss, l. 82–86), the mean over this rank's view-1
    anchors plus the mean over its view-2 anchors, i.e. 2 × the mean over its 2n (DDP averages the
    ranks' gradients). The scale matters: LARS cancels it only for the adapted weights, so biases and
    BN parameters would move half as far. Returns the loss and the 2n×2N logits with the positive's
    column, for the accuracy meters."""
    rank, _ = rank_and_world()
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # 2n×d, this rank's [view 1; view 2]
    z_all = gather_with_grad(z)  # 2N×d, rank r's views at rows r·2n … (r+1)·2n−1
    logits = z @ z_all.t() / tau  # 2n×2N: this rank's anchors against every view
    idx = torch.arange(2 * n, device=z.device)
    logits[idx, rank * 2 * n + idx] = float("-inf")  # k ≠ i in Eq. (1): an anchor is not its own candidate
    labels = rank * 2 * n + (idx + n) % (2 * n)  # the positive: the other view of the same image
    return 2 * F.cross_entropy(logits, labels), logits, labels  # = mean(view-1 anchors) + mean(view-2 anchors)


def build_transform(args) -> common.MultiView:
    """App. A: crop (area 0.08–1, aspect 3/4–4/3) and flip, colour distortion of strength s
    (jitter p 0.8, drop p 0.2), Gaussian blur p 0.5 with σ ∈ [0.1, 2] and a kernel 10 % of the side."""
    s = args.color_jitter_strength
    kernel = 2 * int(args.blur_kernel * args.image_size / 2) + 1  # odd, as official: 23 px at 224
    t = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(0.08, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        transforms.ToTensor(), common.normalize])
    return common.MultiView([t, t])  # two independent draws from the same family (Sec. 2.1)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, arXiv:1708.03888, Alg. 1) with the official SimCLR "classic" momentum:
    each step's lr goes into the buffer, v ← m·v + lr·trust·(g + λw), w ← w − v (lars_optimizer.py,
    google-research/simclr@383d414, l. 101–118, classic_momentum=True). At a constant lr it equals
    b ← m·b + trust·(g + λw), w ← w − lr·b (the form of byol.py and linear_eval.py); while the lr
    changes (warm-up, cosine) past steps keep their own lr instead of taking the current one.
    Parameters in a group with `lars_exclude=True` (biases and BN, official
    `exclude_from_weight_decay`) get trust 1 and no weight decay. _foreach ops over all parameters."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # g + λw
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # local lr η·‖w‖/‖g + λw‖, 1 where either norm is 0 (Alg. 1)
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(grads, list(trust.unbind()))
            bufs = []
            for p, g in zip(params, grads):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads, alpha=group["lr"])  # v ← m·v + lr·trust·(g + λw)
            torch._foreach_sub_(params, bufs)  # w ← w − v


def lars_param_groups(model: nn.Module) -> list:
    """Biases and BN parameters (1-D) get neither weight decay nor LARS adaptation (official code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "lars_exclude": True, "weight_decay": 0.0}]


def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation evaluated: `encoder` without its head (as linear_eval.py reads it)."""
    return pooled(model.encoder, x)


# ---------------------------------------------------------------------------------------- SCAFFOLD
@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient, rank order; the input itself when there is no process group."""
    if not dist.is_initialized():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def resnet(arch: str, stem: str, **kwargs) -> nn.Module:
    """A torchvision ResNet. The "cifar" stem (3×3 stride-1 conv1, no max-pool; SimCLR App. B.9, the
    official `cifar_stem`) is what every reference trains at 32 px with (MoCo's CIFAR demo, lemniscate's
    resnet_cifar too): torchvision's 7×7 stride-2 conv and max-pool would leave layer4 a 1×1 map."""
    net = models.__dict__[arch](**kwargs)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        net.maxpool = nn.Identity()
    return net


def pooled(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's forward without its fc (the head): the features linear_eval.py reads."""
    return torch.flatten(nn.Sequential(*list(net.children())[:-1])(x), 1)


def knn_loaders(args, rank: int, world_size: int, last=common.normalize):
    """The monitor's data: the train and val splits in the evaluation view (as linear_eval.py --knn)."""
    try:
        return [common.build_loader(common.build_dataset(args.data, split, common.eval_transform(args.image_size, last),
                                                         args.data_root, return_index=True),
                                    args.batch_size // world_size, args.workers, rank, world_size, train=False)
                for split in ("train", "val")]
    except common.DataError as err:
        fail(f"--knn-every: {err}")


def knn_monitor(model: nn.Module, loaders, device, args) -> float:
    """Weighted kNN top-1 (Wu et al. 2018, Sec. 3.4) of the backbone with BN in eval mode; every rank
    embeds its shard and gets the same number. No RNG is drawn, so training is unchanged by it."""
    model.eval()
    acc1, _ = common.knn_accuracy(partial(backbone_features, unwrap(model)), *loaders, device,
                                  concat_all_gather, args.knn_k, args.knn_t)
    model.train()
    return float(acc1)


# ------------------------------------------------------------------------------------------ METHOD
def train_one_epoch(loader, model, optimizer, epoch: int, args, device, is_main: bool, preempt=None) -> dict:
    batch_time, data_time = common.AverageMeter("Time", ":6.3f"), common.AverageMeter("Data", ":6.3f")
    losses = common.AverageMeter("Loss", ":.4e")
    top1, top5 = common.AverageMeter("Acc@1", ":6.2f"), common.AverageMeter("Acc@5", ":6.2f")
    progress = common.ProgressMeter(len(loader), [batch_time, data_time, losses, top1, top5],
                                    prefix=f"Epoch: [{epoch}/{args.epochs}]")
    model.train()
    end = time.time()
    for i, (images, _) in preempt.steps(loader, epoch) if preempt else enumerate(loader):
        data_time.update(time.time() - end)
        adjust_learning_rate(optimizer, epoch + i / len(loader), args)  # per step, from (epoch, step)
        x1, x2 = (x.to(device, non_blocking=True) for x in images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            z1, z2 = model(x1, x2)
        loss, logits, labels = nt_xent_loss(z1.float(), z2.float(), args.temperature)
        acc1, acc5 = common.accuracy(logits, labels, topk=(1, 5))  # the positive among 2N−1 candidates
        losses.update(loss, logits.shape[0]), top1.update(acc1, logits.shape[0]), top5.update(acc5, logits.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == len(loader) - 1:
            check_finite(losses, epoch, i, args)  # the only host sync, every print-freq steps
            if is_main:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "acc1": top1.avg, "acc5": top5.avg,
            "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: float, args):
    """Sec. 2.3: linear warm-up over --warmup-epochs to init_lr, then cosine decay to 0 (no restarts).
    `epoch` is fractional (epoch + step/steps_per_epoch): a pure function of the step, so resume is exact."""
    if epoch < args.warmup_epochs:
        lr = args.init_lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1)
        lr = args.init_lr * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------- SCAFFOLD
def fail(message: str):
    raise SystemExit(f"{PROG}: {message}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_finite(meter: common.AverageMeter, epoch: int, step: int, args):
    if not math.isfinite(meter.avg):
        fail(f"loss is {meter.avg} at epoch {epoch} step {step}; stopped, the last checkpoint in "
             f"'{args.output_dir}' is untouched")


def seed_everything(seed, offset: int = 0):
    """With --seed, every epoch's randomness is a function of (seed, epoch, rank): resuming at an
    epoch boundary then reproduces the uninterrupted run without saving RNG states."""
    if seed is not None:
        random.seed(seed + offset)
        torch.manual_seed(seed + offset)


def prepare_output_dir(output_dir: str, is_main: bool):
    """Before any work: the folder takes a file (a read-only one fails now, not after an epoch), and the
    checkpoint.pth.tar.tmp of a save that was killed is removed."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        if is_main:
            tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as err:
        fail(f"--output-dir '{output_dir}' is not writable: {err.strerror or err}")
    tmp = os.path.join(output_dir, "checkpoint.pth.tar.tmp")
    if is_main and os.path.exists(tmp):
        os.remove(tmp)
        print(f"=> removed '{tmp}', left by a save that was cut off", flush=True)


def save_checkpoint(state: dict, output_dir: str):
    """Atomic: a crash while writing never leaves a truncated checkpoint. A failed write (disk full,
    permissions) ends the run in one line, the previous checkpoint untouched."""
    path = os.path.join(output_dir, "checkpoint.pth.tar")
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's zip writer on a full disk
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        free = shutil.disk_usage(output_dir).free / 2 ** 20 if os.path.isdir(output_dir) else 0
        kept = f"the previous checkpoint '{path}' is intact" if os.path.isfile(path) else "no earlier checkpoint"
        fail(f"--output-dir: saving epoch {state['epoch']} failed ({first_line(err)}; {free:.0f} MiB free); {kept}")


def resume_path(args) -> str:
    if args.resume == "auto":
        path = os.path.join(args.output_dir, "checkpoint.pth.tar")
        return path if os.path.isfile(path) else ""
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume: no checkpoint at '{args.resume}'")
    return args.resume


def first_line(err: Exception) -> str:
    """An exception's first sentence, for a one-line message; torch's C++ location dropped
    ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", a full disk)."""
    text = str(err).strip().split("] . ")[-1]
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def read_checkpoint(path: str, flag: str) -> dict:
    """torch.load, tensors only. A file that is not a checkpoint is one line that names it (never the
    advice to load it with weights_only=False, which would run any code it holds)."""
    if not os.path.isfile(path):
        fail(f"{flag}: no checkpoint at '{path}'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if os.path.getsize(path) == 0:
            why = "the file is empty"
        elif "WeightsUnpickler error: " in str(err):  # objects other than tensors, code included
            why = str(err).split("WeightsUnpickler error: ")[1].split(". ")[0]
        else:
            why = f"not a torch.save file, or a truncated one ({type(err).__name__}: {first_line(err)})"
        fail(f"{flag}: cannot read '{path}' as a tensors-only checkpoint: {why}")


def mismatch(own: dict, found: dict) -> str:
    """Why the state_dict `found` does not load into a model whose state_dict is `own`: one line, '' if it loads."""
    def shape(key):
        return tuple(getattr(found[key], "shape", ()))

    groups = {"missing": [k for k in own if k not in found], "unexpected": [k for k in found if k not in own],
              "other shape": [f"{k} {shape(k)} vs {tuple(v.shape)} here" for k, v in own.items()
                              if k in found and shape(k) != tuple(v.shape)]}
    return "; ".join(f"{what} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                     for what, keys in groups.items() if keys)


def load_checkpoint(path: str, method: str) -> dict:
    """--resume, read before any work: a file that is not a checkpoint of this method stops the run here."""
    ckpt = read_checkpoint(path, "--resume")
    if not isinstance(ckpt, dict) or ckpt.get("method") != method:
        found = ckpt.get("method", "no method field") if isinstance(ckpt, dict) else type(ckpt).__name__
        fail(f"'{path}' is not a {method} checkpoint (found: {found})")
    return ckpt


def restore_checkpoint(ckpt: dict, path: str, model: nn.Module, optimizer) -> int:
    """Restores model (buffers included), optimizer; returns the number of epochs completed."""
    state = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", {}).items()}
    why = mismatch(model.state_dict(), state)
    if why:
        fail(f"checkpoint '{path}' does not fit this model: {why} (it was saved with -a {ckpt.get('arch')} and the "
             f"model flags in its 'args')")
    try:
        model.load_state_dict(state)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        fail(f"checkpoint '{path}' does not fit this model: {first_line(err)}")
    return ckpt["epoch"]


EXIT_STOPPED = 75  # a stop signal ended the run after writing a checkpoint (sysexits EX_TEMPFAIL: run it again)


class Preemption:
    """Stop at a step, resume there bit for bit (README: Preemption and resume). SIGTERM, SIGUSR1 and
    SIGINT set a flag: the step in flight finishes, rank 0 writes a checkpoint of (epoch, step), every
    rank exits with EXIT_STOPPED. Under torchrun the ranks agree on the flag every --print-freq steps,
    where the loop syncs anyway. A mid-epoch checkpoint holds every rank's RNG states (MoCo's shuffle,
    the NCE noise): saving them, not reseeding every step, leaves a run never stopped as it was. A
    resumed epoch skips the samples it trained on (views are a function of (seed, epoch, index))."""

    def __init__(self, args, checkpoint, is_main: bool, device):
        self.args, self.checkpoint, self.is_main, self.device = args, checkpoint, is_main, device
        self.epoch, self.step, self.rng = 0, 0, None  # where the run starts; this rank's RNG states mid-epoch
        self.flag, self.last_save = False, time.time()
        # forked loader workers inherit the handler, so a signal to the whole process group leaves them running
        self.handlers = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def handle(self, signum, frame):
        self.flag = True  # a second signal (torchrun forwards its own) changes nothing

    def close(self):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)

    def resume(self, ckpt: dict) -> int:
        """Continue from a checkpoint's (epoch, step); returns the epoch. Mid-epoch, the samples and RNG
        streams are per rank: another world size or global batch is refused."""
        self.epoch, self.step = ckpt["epoch"], ckpt.get("step", 0)
        rank, world_size = rank_and_world()
        if self.step:
            saved = (ckpt["world_size"], ckpt["args"]["batch_size"])
            if saved != (world_size, self.args.batch_size):
                fail(f"the checkpoint stopped mid-epoch (epoch {self.epoch} step {self.step}) with {saved[0]} "
                     f"process(es) and global batch {saved[1]}; resume it with the same, not {world_size} and "
                     f"{self.args.batch_size}")
            self.rng = ckpt["rng"][rank]
        return self.epoch

    def steps(self, loader, epoch: int):
        """(step, batch) of `epoch` from where the run stands, with the checks between steps."""
        start = self.step if epoch == self.epoch else 0
        if start:
            loader.sampler.set_epoch(epoch, start * loader.batch_size)
        batches = enumerate(loader, start)  # making the iterator draws its worker seed from the RNG
        if start:
            torch.set_rng_state(self.rng["torch"])
            random.setstate(self.rng["random"])
            if "cuda" in self.rng:
                torch.cuda.set_rng_state(self.rng["cuda"], self.device)
        for i, batch in batches:
            yield i, batch
            if i + 1 < len(loader):  # after the last step main saves and calls epoch_done
                self.check(epoch, i + 1, sync=i % self.args.print_freq == 0)

    def check(self, epoch: int, step: int, sync: bool):
        """After `step` steps of `epoch`: save when due, stop when flagged."""
        minutes = self.args.save_every_minutes
        stop, due = self.flag, minutes > 0 and time.time() - self.last_save >= 60 * minutes
        if dist.is_initialized():  # a rank acts only on what all ranks agreed on
            stop, due = self.agree(stop, due) if sync else (False, False)
        if stop or due or (self.args.save_every_steps > 0 and step % self.args.save_every_steps == 0):
            self.save(epoch, step)
        if stop:
            self.exit(epoch, step)

    def epoch_done(self, epoch: int):
        """After the epoch-boundary checkpoint: stop if flagged and epochs are left."""
        self.last_save = time.time()
        stop = self.agree(self.flag)[0] if dist.is_initialized() else self.flag
        if stop and epoch < self.args.epochs:
            self.exit(epoch, 0)

    def agree(self, *flags) -> list:
        flags = torch.tensor(flags, dtype=torch.float32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(flag) for flag in flags.tolist()]

    def save(self, epoch: int, step: int):
        rng = {"torch": torch.get_rng_state(), "random": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = [rng]
        if dist.is_initialized():
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, rng)
        if self.is_main:
            save_checkpoint({**self.checkpoint(epoch, step), "world_size": len(rngs), "rng": rngs}, self.args.output_dir)
        self.last_save = time.time()

    def exit(self, epoch: int, step: int):
        if dist.is_initialized():
            dist.barrier()  # no rank leaves before the checkpoint is written
            dist.destroy_process_group()
        self.close()
        if self.is_main:
            print(f"stopped at epoch {epoch} step {step}; continue with --resume auto", flush=True)
        raise SystemExit(EXIT_STOPPED)


def main(argv=None):
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world_size:
        fail(f"global batch {args.batch_size} does not divide by the world size {world_size}")
    if args.batch_size // world_size < 2:  # BatchNorm in training mode needs two values per channel
        fail(f"-b/--batch-size {args.batch_size} leaves {args.batch_size // world_size} image per process (world size "
             f"{world_size}); BatchNorm in training needs >= 2")
    start_path = resume_path(args)

    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = rank_and_world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.seed is None
    is_main = rank == 0
    seed_everything(args.seed)
    prepare_output_dir(args.output_dir, is_main)
    if start_path:  # SCAFFOLD: read before any work; a finished run ends here (exit status 0)
        if is_main:
            print(f"=> loading checkpoint '{start_path}'", flush=True)
        resumed = load_checkpoint(start_path, "simclr")
        if resumed["epoch"] >= args.epochs:
            if is_main:
                print(f"=> nothing to do: already at epoch {resumed['epoch']} of {args.epochs}; raise --epochs to "
                      "train on", flush=True)
            if ddp:
                dist.destroy_process_group()
            return

    try:
        dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root)
    except common.DataError as err:
        fail(str(err))
    if len(dataset) < args.batch_size:
        fail(f"'{args.data}' has {len(dataset)} images, fewer than the global batch {args.batch_size}")
    loader = common.build_loader(dataset, args.batch_size // world_size, args.workers, rank,
                                 world_size, train=True, seed=args.seed)
    knn_data = knn_loaders(args, rank, world_size) if args.knn_every else None

    if is_main:
        print(f"=> creating model '{args.arch}'", flush=True)
    model = SimCLR(partial(resnet, args.arch, args.stem), args.proj_out_dim).to(device)
    if ddp and device.type == "cuda":  # METHOD: Sec. 2.2, global BN (GPU-only in torch: per-process BN on CPU)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:  # SCAFFOLD
        model = model.to(memory_format=torch.channels_last)
    if args.compile:  # SCAFFOLD: nn.Module.compile works in place, so state_dict keys get no `_orig_mod.`
        for net in model.modules():
            if isinstance(net, models.ResNet):
                net.compile()
    # METHOD: Sec. 2.3, 0.3 × batch/256 (4.8 at 4096); App. B.1, 0.075 × √batch (official `learning_rate_scaling`,
    # model_util.py@383d414 l. 64-67). LARS moves each layer by ≈ lr·0.001 of its norm a step, so batch 64 with
    # linear scaling (lr 0.075) barely moves the weights: measured 0.4 % an epoch of 39 steps at 32 px.
    args.init_lr = args.lr * (args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size))
    optimizer = LARS(lars_param_groups(model), args.init_lr, args.momentum, args.wd)

    def checkpoint(epoch: int, step: int = 0) -> dict:  # SCAFFOLD: the run after `step` steps of `epoch`
        return {"method": "simclr", "arch": args.arch, "epoch": epoch, "step": step, "args": vars(args),
                "state_dict": {"module." + k: v for k, v in unwrap(model).state_dict().items()},
                "optimizer": optimizer.state_dict()}

    preempt = Preemption(args, checkpoint, is_main, device)  # SCAFFOLD: a stop signal now ends the run at a step
    if start_path:
        restore_checkpoint(resumed, start_path, model, optimizer)
        args.start_epoch = preempt.resume(resumed)
        del resumed  # its tensors are the model's and the optimizer's now
        if is_main:
            print(f"=> loaded checkpoint '{start_path}' (epoch {args.start_epoch})", flush=True)
    if ddp:  # no per-step buffer broadcast: a queue/bank stays identical by construction; BN statistics stay per rank
        ddp_flags = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_flags else "broadcast_buffers"  # torch's new name
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                                    **{no_sync: False})

    try:  # SCAFFOLD: a run that fails (a NaN loss, a bad image) still gives the signals back
        for epoch in range(args.start_epoch, args.epochs):
            loader.sampler.set_epoch(epoch)
            seed_everything(args.seed, 1000 * (epoch + 1) + rank)
            try:
                metrics = train_one_epoch(loader, model, optimizer, epoch, args, device, is_main, preempt)
                if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                    start = time.time()
                    metrics["knn_acc1"] = knn_monitor(model, knn_data, device, args)
                    if is_main:
                        print(f" * kNN Acc@1 {metrics['knn_acc1']:.2f} (epoch {epoch}, backbone, k={args.knn_k}, "
                              f"T={args.knn_t}, {time.time() - start:.1f} s)", flush=True)
            except common.DataError as err:
                fail(common.data_error_message(err))
            if is_main:
                save_checkpoint(checkpoint(epoch + 1), args.output_dir)
                with open(os.path.join(args.output_dir, "log.txt"), "a") as f:  # after the save: log and checkpoint agree
                    f.write(json.dumps(metrics) + "\n")
            preempt.epoch_done(epoch + 1)
    finally:
        preempt.close()
    if is_main:
        print(f"=> done: epoch {args.epochs} of {args.epochs}; checkpoint '{os.path.join(args.output_dir, 'checkpoint.pth.tar')}'",
              flush=True)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback: saves are atomic, so every checkpoint on disk is whole
        print(f"{PROG}: interrupted; the checkpoints saved so far are intact", file=sys.stderr)
        raise SystemExit(130)  # 128 + SIGINT, as a shell reports it
