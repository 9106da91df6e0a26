"""InsDis: Unsupervised Feature Learning via Non-Parametric Instance Discrimination.
Wu, Xiong, Yu, Lin, CVPR 2018, arXiv:1805.01978.

Every training image is its own class. A memory bank V holds one L2-normalised 128-d feature per
image; the encoder is trained so that an image's feature picks out its own bank row among all N
(the non-parametric softmax, Eq. 2). The N-way softmax is approximated by NCE against K rows drawn
uniformly from the bank (Eq. 4-7) with a normalisation constant Z fixed after the first batch
(Eq. 8); --softmax uses the (K+1)-way cross-entropy instead. Each step moves the batch's bank rows
towards the new features. Progress: the online kNN monitor on the backbone (Sec. 3.4's weighted kNN).

    python insdis.py --data synthetic:2500 -a resnet18 -b 64 --epochs 6 --stem imagenet -j 2 --seed 0 --nce-k 512 --softmax --bank-init features  # 2 CPU cores (docs/results.md)
    torchrun --nproc_per_node=4 insdis.py --data /imagenet                                 # paper: NCE, K 4096
    torchrun --nproc_per_node=4 insdis.py --data /imagenet --softmax --nce-k 16384          # CMC repo's better setting
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 insdis.py --data /imagenet

Documentation: docs/insdis.md (usage, implementation details against the official code, results, metrics).
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

PROG = "insdis.py"
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",  # -a: the torchvision
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]  # builders of a ResNet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="InsDis pre-training (instance discrimination, memory bank)",
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
    group.add_argument("--feat-dim", "--feat_dim", type=int, default=128, help="feature dimension d")
    group = parser.add_argument_group("method")
    group.add_argument("--nce-k", "--nce_k", type=int, default=4096, help="noise samples K per positive")
    group.add_argument("--nce-t", "--nce_t", type=float, default=0.07, help="temperature τ (Eq. 2)")
    group.add_argument("--nce-m", "--nce_m", type=float, default=0.5, help="bank momentum (0: plain replacement)")
    group.add_argument("--softmax", action="store_true", help="(K+1)-way softmax cross-entropy instead of NCE")
    group.add_argument("--prox-lambda", type=float, default=0.0, help="proximal term λ (Eq. 10); 0 = off")
    group.add_argument("--bank-init", choices=["random", "features"], default="random",
                       help="random: random unit rows (Sec. 3.1, official); features: the initial encoder's feature "
                            "of every image, so the first epoch's positives are not random (short runs)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=200, help="epochs to train in all")
    group.add_argument("-b", "--batch-size", type=int, default=256, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=float, default=0.03, help="lr (not scaled by batch)")
    group.add_argument("--momentum", type=float, default=0.9, help="optimizer momentum")
    group.add_argument("--wd", "--weight-decay", type=float, default=1e-4, help="weight decay")
    group.add_argument("--schedule", type=int, nargs="*", default=[120, 160], help="lr ×0.1 at these epochs")
    group = parser.add_argument_group("run")  # SCAFFOLD
    group.add_argument("--output-dir", default="./runs/insdis", help="checkpoint.pth.tar and log.txt go here")
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
        ("--nce-k", args.nce_k >= 1, ">= 1 and below the number of images"),
        ("--nce-t", args.nce_t > 0, "> 0"),
        ("--nce-m", 0 <= args.nce_m <= 1, "in [0, 1]"),
        ("--feat-dim", args.feat_dim >= 1, ">= 1"),
        ("--prox-lambda", args.prox_lambda >= 0, ">= 0"),
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
class InsDis(nn.Module):
    def __init__(self, base_encoder, n_data: int, dim: int = 128, K: int = 4096, T: float = 0.07,
                 m: float = 0.5, softmax: bool = False):
        super().__init__()
        self.n_data, self.K, self.T, self.m, self.softmax = n_data, K, T, m, softmax
        self.encoder = base_encoder(num_classes=dim)  # fc is the 128-d projection (Sec. 3, Fig. 2)
        # Sec. 3.1: one feature per training image, initialised as random unit vectors. Buffers: in the
        # checkpoint, restored on resume, never broadcast by DDP (kept identical by _update_memory). DDP
        # with broadcast_buffers=False does not sync buffers at start either: a fixed generator makes
        # the initial bank the same on every rank, with or without --seed.
        initial = torch.randn(n_data, dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("memory", F.normalize(initial, dim=1))  # N×d
        self.register_buffer("Z", torch.tensor(-1.0))  # NCE normalisation constant, −1 = not estimated yet
        self.Z_known = False  # host-side flag: the buffer is read on the host once per run, not every step

    @torch.no_grad()
    def _estimate_Z(self, s: torch.Tensor):
        """Eq. (8): Z ≈ N·E_j[exp(v_j·f/τ)], estimated on the first batch and then fixed. The batch
        mean is averaged over the ranks, so every rank holds the same Z."""
        if self.Z_known:
            return
        if not self.Z > 0:  # not resumed from a checkpoint that has it
            mean = s.exp().mean()
            if dist.is_initialized():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            self.Z.copy_(mean * self.n_data)
        self.Z_known = True

    @torch.no_grad()
    def _update_memory(self, index: torch.Tensor, f: torch.Tensor):
        """v_i ← normalise(m·v_i + (1−m)·f_i) for the images of the whole global batch (Sec. 3.1; the
        momentum m = 0.5 is the official code's). All ranks apply the same gathered update, so the
        banks stay identical without ever being sent."""
        index, f = concat_all_gather(index), concat_all_gather(f)  # global_batch, global_batch×d
        self.memory.index_copy_(0, index, F.normalize(self.m * self.memory[index] + (1 - self.m) * f, dim=1))

    def forward(self, x: torch.Tensor, index: torch.Tensor):
        """x: B×3×H×W; index: B dataset indices. Returns out (B×(K+1), column 0 the positive: NCE
        P = exp(s)/Z, or with --softmax the logits s), the features f (B×d, with gradient) and the
        positives' bank rows v_i^(t−1) (B×d). The caller updates the bank after the step."""
        f = self.encoder(x)  # B×d
        idx = torch.randint(self.n_data, (x.shape[0], self.K + 1), device=x.device)  # uniform noise, per rank
        idx[:, 0] = index  # the positive: the image's own bank row
        weight = self.memory.index_select(0, idx.view(-1)).view(*idx.shape, -1)  # B×(K+1)×d rows; the bank is never copied
        with torch.autocast(x.device.type, enabled=False):  # --amp: similarities and softmax in float32
            f = F.normalize(f.float(), dim=1)  # float32 like the bank it is written into
            s = torch.bmm(weight, f.unsqueeze(2)).squeeze(2) / self.T  # B×(K+1), v_j·f/τ (Eq. 2)
            if self.softmax:
                return s, f, weight[:, 0]
            self._estimate_Z(s)
            return s.exp() / self.Z, f, weight[:, 0]  # Eq. (4) with Z_i ≈ Z


@torch.no_grad()
def fill_bank(model: nn.Module, loader, device):
    """--bank-init features: row i ← the initial encoder's normalised feature of image i (evaluation
    view, BN in training mode as in a step), gathered over the ranks, before the first step. A
    deviation, off by default: the memory bank of Sec. 3.1 starts as random unit rows in the official
    code (lemniscate lib/NCEAverage.py l. 83–84 @f7cfe29). With random rows the
    first epoch trains every image towards a random direction: measured on synthetic:2500, the kNN
    monitor fell from 71.0 % (random encoder) to 29.0 % after that epoch and was 40.4 % after five.
    A last batch of one image per rank is skipped (BN needs two): its rows stay random."""
    for images, _, index in loader:
        if images.shape[0] > 1:
            f = F.normalize(model.encoder(images.to(device, non_blocking=True)).float(), dim=1)
            model.memory.index_copy_(0, concat_all_gather(index.to(device)), concat_all_gather(f))


def nce_loss(P: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE (Eq. 6-7), as the official NCECriterion. P: B×(K+1) = exp(s)/Z, column 0 the positive.
    With uniform noise Pn = 1/N, a score came from the data with posterior h = P/(P + K·Pn);
    L = −mean_B[log h(positive) + Σ_k log(1 − h(noise_k))]."""
    noise = (P.shape[1] - 1) / n_data  # K·Pn
    log_h_positive = (P[:, 0] / (P[:, 0] + noise + eps)).log()  # B
    log_1_minus_h_noise = (noise / (P[:, 1:] + noise + eps)).log()  # B×K
    return -(log_h_positive + log_1_minus_h_noise.sum(1)).mean()


def insdis_loss(out: torch.Tensor, f: torch.Tensor, v: torch.Tensor, n_data: int, softmax: bool,
                prox_lambda: float = 0.0):
    """NCE, or with --softmax the cross-entropy of the K+1 sampled candidates, label 0 (Eq. 2
    restricted to the sample). Plus Eq. (10)'s proximal term λ‖v_i^(t) − v_i^(t−1)‖² on the positive,
    with v_i^(t) = f_i, the current feature. Also returns the mean probability of the positive (the
    official `prob`): NCE mode P = exp(s)/Z of column 0, softmax mode its softmax probability."""
    if softmax:
        loss = F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long, device=out.device))
        prob = out.softmax(1)[:, 0].mean()
    else:
        loss, prob = nce_loss(out, n_data), out[:, 0].mean()
    if prox_lambda:
        loss = loss + prox_lambda * (f - v).pow(2).sum(1).mean()
    return loss, prob


def build_transform(args) -> transforms.Compose:
    """One view per image, the official lemniscate recipe (the one MoCo v1 adopted)."""
    return transforms.Compose([transforms.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
                               transforms.RandomGrayscale(p=0.2),
                               transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(), common.normalize])


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
    losses, probs = common.AverageMeter("Loss", ":.4e"), common.AverageMeter("Prob", ":.4f")
    progress = common.ProgressMeter(len(loader), [batch_time, data_time, losses, probs],
                                    prefix=f"Epoch: [{epoch}/{args.epochs}]")
    model.train()
    n_data = unwrap(model).n_data
    end = time.time()
    for i, (images, _, index) in preempt.steps(loader, epoch) if preempt else enumerate(loader):
        data_time.update(time.time() - end)
        images, index = images.to(device, non_blocking=True), index.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            out, f, v = model(images, index)
        loss, prob = insdis_loss(out, f, v, n_data, args.softmax, args.prox_lambda)
        losses.update(loss, images.shape[0]), probs.update(prob, images.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        unwrap(model)._update_memory(index, f.detach())
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == len(loader) - 1:
            check_finite(losses, epoch, i, args)  # the only host sync, every print-freq steps
            if is_main:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "prob": probs.avg, "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: int, args):
    """Per epoch: ×0.1 at each --schedule milestone (official: 120 and 160 of 200)."""
    lr = args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)
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
        resumed = load_checkpoint(start_path, "insdis")
        if resumed["epoch"] >= args.epochs:
            if is_main:
                print(f"=> nothing to do: already at epoch {resumed['epoch']} of {args.epochs}; raise --epochs to "
                      "train on", flush=True)
            if ddp:
                dist.destroy_process_group()
            return

    try:
        dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root,
                                       return_index=True)  # METHOD: the index is the bank row
    except common.DataError as err:
        fail(str(err))
    if len(dataset) < args.batch_size:
        fail(f"'{args.data}' has {len(dataset)} images, fewer than the global batch {args.batch_size}")
    if args.nce_k >= len(dataset):  # METHOD: the K noise rows are drawn from a bank of one row per image
        fail(f"--nce-k {args.nce_k} must be smaller than the memory bank ({len(dataset)} images in '{args.data}')")
    loader = common.build_loader(dataset, args.batch_size // world_size, args.workers, rank,
                                 world_size, train=True, seed=args.seed)
    knn_data = knn_loaders(args, rank, world_size) if args.knn_every else None
    if is_main:
        print(f"=> creating model '{args.arch}'", flush=True)
    model = InsDis(partial(resnet, args.arch, args.stem), len(dataset), args.feat_dim, args.nce_k, args.nce_t,
                   args.nce_m, args.softmax).to(device)
    if args.channels_last:  # SCAFFOLD
        model = model.to(memory_format=torch.channels_last)
    if args.compile:  # SCAFFOLD: nn.Module.compile works in place, so state_dict keys get no `_orig_mod.`
        for net in model.modules():
            if isinstance(net, models.ResNet):
                net.compile()
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    if args.bank_init == "features" and not start_path:  # METHOD: a resumed run has its bank in the checkpoint
        fill_bank(model, common.build_loader(common.build_dataset(args.data, "pretrain", common.eval_transform(
            args.image_size), args.data_root, return_index=True), args.batch_size // world_size, args.workers, rank,
            world_size, train=False), device)

    def checkpoint(epoch: int, step: int = 0) -> dict:  # SCAFFOLD: the run after `step` steps of `epoch`
        return {"method": "insdis", "arch": args.arch, "epoch": epoch, "step": step, "args": vars(args),
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
            adjust_learning_rate(optimizer, epoch, args)
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
