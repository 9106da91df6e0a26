"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations. Chen, Kornblith, Norouzi, Hinton,
ICML 2020, arXiv:2002.05709.

Two augmentations of every image go through one encoder f and a small MLP head g (Sec. 2.1). NT-Xent (Eq. 1) makes each
of the 2N views pick its partner among the other 2N−1 views of the batch: the negatives are the batch itself, so large
batches with LARS and global BN (Sec. 2.2) and strong colour distortion plus crops (Sec. 3, App. A) make it work. Under
DDP the views of all processes are gathered with their gradient: one loss over the global batch.
    python simclr.py --data synthetic:2500 -a resnet18 -b 64 --epochs 12 --stem imagenet -j 2 --seed 0 \
        --temperature 0.5 --warmup-epochs 1 --lr-scaling sqrt --lr 0.125  # CPU
    torchrun --nproc_per_node=8 simclr.py --data /imagenet  # Sec. 2.3: -b 4096 (global), 100 epochs
    torchrun --nnodes=4 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 simclr.py --data /imagenet
Usage, implementation details against the official code, results: docs/simclr.md."""
import argparse
import contextlib
import inspect
import json
import math
import os
import random
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
from torch.nn.parallel import DistributedDataParallel as DDP

import common

PROG = "simclr.py"
RESNETS = [name for name in models.list_models(module=models) if name.startswith(("resnet", "resnext", "wide_resnet"))]
GONE = ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank")  # torchrun's now


# ------------------------------------------------------------------------------------------------------------ METHOD
class SimCLR(nn.Module):
    """f (the ResNet) and g (its fc, Sec. 2.1): z = g(h) = W2·σ(W1·h), hidden width that of h (2048-2048-128 for
    ResNet-50). After pre-training g is thrown away and h is the representation."""

    def __init__(self, base_encoder, dim: int = 128):
        super().__init__()
        # γ = 0 in the last BN of every residual block, each block starting as the identity: the official resnet.py
        # (google-research/simclr@383d414, l. 395 and 480: init_zero=True)
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        hidden = self.encoder.fc.in_features
        self.encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), self.encoder.fc)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Both views in one pass, so BN normalises over all 2N views as in the official code."""
        return self.encoder(torch.cat([x1, x2])).chunk(2)  # 2×(N×dim)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float):
    """Eq. (1): ℓ(i,j) = −log exp(sim(z_i,z_j)/τ) / Σ_{k≠i} exp(sim(z_i,z_k)/τ), sim the cosine, over the 2N
    views of the global batch; the 2N−2 views of other images are the negatives. The scale is the official code's, not
    Alg. 1's mean over 2N anchors: loss_a + loss_b of objective.py (google-research/simclr@383d414, l. 82–86), the
    mean over this rank's view-1 anchors plus that over its view-2 anchors. It matters: LARS cancels it for the adapted
    weights only, biases and BN would move half as far. Also returns the 2n×2N logits and the positives' columns."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # 2n×d, this rank's [view 1; view 2]
    z_all = gather_with_grad(z)  # 2N×d, rank r's views at rows r·2n … (r+1)·2n−1
    logits = z @ z_all.t() / tau  # 2n×2N: this rank's anchors against every view
    idx = torch.arange(2 * n, device=z.device)
    logits[idx, rank * 2 * n + idx] = float("-inf")  # k ≠ i in Eq. (1): an anchor is not its own candidate
    labels = rank * 2 * n + (idx + n) % (2 * n)  # the positive: the other view of the same image
    return 2 * F.cross_entropy(logits, labels), logits, labels  # = mean(view-1 anchors) + mean(view-2 anchors)


class GatherLayer(torch.autograd.Function):
    """All-gather that keeps the gradient. Backward: every rank's loss has a gradient for every rank's rows (as
    candidates); the all-reduce sum hands rank r the sum over all losses for its own rows. With the global loss the mean
    of the ranks' losses, rank r's embeddings get W·∂L/∂z_r and DDP's 1/W average makes the parameter gradient
    ∂L/∂θ of one process holding the global batch. Without it, rank r would miss the other ranks' terms."""

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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:  # all ranks' rows in rank order, with gradient
    return GatherLayer.apply(x) if dist.is_initialized() else x


def build_transform(args) -> common.MultiView:
    """App. A: crop (area 0.08–1, aspect 3/4–4/3) and flip, colour distortion of strength s (jitter p 0.8, drop p
    0.2), Gaussian blur p 0.5 with σ ∈ [0.1, 2] and a kernel 10 % of the side."""
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
    """LARS (You et al. 2017, arXiv:1708.03888, Alg. 1) with the official SimCLR "classic" momentum: each step's lr goes
    into the buffer, v ← m·v + lr·trust·(g + λw), w ← w − v (lars_optimizer.py,
    google-research/simclr@383d414, l. 101–118). Groups with lars_exclude (biases and BN, official
    exclude_from_weight_decay) get trust 1, no decay."""

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
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                # the local lr η·‖w‖/‖g + λw‖, 1 where either norm is 0 (Alg. 1)
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(grads, list(trust.unbind()))
            bufs = []
            for p in params:
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


def resnet(arch: str, stem: str, **kwargs) -> nn.Module:
    """The backbone, a torchvision ResNet: swap in your own network here and in `pooled`. The "cifar" stem (3×3
    stride-1 conv1, no max-pool; SimCLR App. B.9, MoCo's CIFAR demo) leaves layer4 4×4 at 32 px, torchvision's 1×1."""
    net = models.__dict__[arch](**kwargs)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        net.maxpool = nn.Identity()
    return net


def pooled(net: nn.Module, x: torch.Tensor) -> torch.Tensor:  # the backbone's features: all but the head (fc)
    return torch.flatten(nn.Sequential(*list(net.children())[:-1])(x), 1)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:  # all ranks' rows in rank order; one process: the input
    if not dist.is_initialized():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def train_one_epoch(loader, model, optimizer, epoch: int, args, run) -> dict:
    step_time, data_time = common.AverageMeter("Time", ":6.3f"), common.AverageMeter("Data", ":6.3f")
    losses = common.AverageMeter("Loss", ":.4e")
    top1, top5 = common.AverageMeter("Acc@1", ":6.2f"), common.AverageMeter("Acc@5", ":6.2f")
    progress = common.ProgressMeter(len(loader), [step_time, data_time, losses, top1, top5], f"Epoch: [{epoch}]",
                                    steps_after=(args.epochs - epoch - 1) * len(loader))
    model.train()
    end = time.time()
    for i, (images, _) in run.steps(loader, epoch):
        data_time.update(time.time() - end)
        adjust_learning_rate(optimizer, epoch + i / len(loader), args)  # per step, from (epoch, step)
        x1, x2 = (x.to(run.device, non_blocking=True) for x in images)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=args.amp):
            z1, z2 = model(x1, x2)
        loss, logits, labels = nt_xent_loss(z1.float(), z2.float(), args.temperature)
        acc1, acc5 = common.accuracy(logits, labels, topk=(1, 5))  # the positive among 2N−1 candidates
        for meter, value in ((losses, loss), (top1, acc1), (top5, acc5)):
            meter.update(value, logits.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i + 1 == len(loader):  # the meters' only host sync
            if not math.isfinite(losses.avg):
                fail(f"loss is {losses.avg} at epoch {epoch} step {i}; stopped, the last checkpoint is as it was")
            if run.rank == 0:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "acc1": top1.avg, "acc5": top5.avg,
            "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: float, args):
    """Sec. 2.3: linear warm-up over --warmup-epochs to init_lr, then cosine decay to 0 (no restarts). `epoch` is
    fractional (epoch + step/steps per epoch): a function of the step, so a resumed run takes the same lr."""
    if epoch < args.warmup_epochs:
        lr = args.init_lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1)
        lr = args.init_lr * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr


def number(cast, low=0, high=math.inf, open_low=False):  # argparse type=: out of range is one line naming the flag
    def numeric(text: str):  # its name is in argparse's "invalid numeric value"
        if not low <= cast(text) <= high or (open_low and cast(text) == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}] (got {text})")
        return cast(text)
    return numeric


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="SimCLR pre-training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", default=argparse.SUPPRESS, help="the same as --data (official spelling)")
    group.add_argument("--data", help="an image folder (ROOT/train/CLASS/*), synthetic[:N], cifar10, cifar100, stl10")
    group.add_argument("--data-root", default="./data", help="where cifar10, cifar100 and stl10 are downloaded")
    group.add_argument("--image-size", type=number(int, 1), help="crop; None: 224, 32 (CIFAR, synthetic), 96 (STL)")
    group.add_argument("-j", "--workers", type=number(int), default=8, help="data-loading workers per process")
    group = parser.add_argument_group("model")
    group.add_argument("-a", "--arch", default="resnet50", choices=RESNETS, metavar="ARCH", help="a torchvision ResNet")
    group.add_argument("--stem", choices=["auto", "cifar", "imagenet"], default="auto", help="auto: cifar if ≤ 32 px")
    group.add_argument("--proj-out-dim", type=number(int, 1), default=128, help="output size of the head g (Sec. 2.1)")
    group = parser.add_argument_group("method")
    group.add_argument("--temperature", type=number(float, 0, open_low=True), default=0.1,
                       help="τ of Eq. (1); 0.1 at batch 4096 (Table 5)")
    group.add_argument("--color-jitter-strength", type=number(float, 0, 2.5), default=1.0,
                       help="s: jitter (0.8s, 0.8s, 0.8s, 0.2s); hue 0.2s ≤ 0.5")
    group.add_argument("--blur-kernel", type=number(float, 0, 1), default=0.1, help="blur kernel / image side (App. A)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=number(int, 1), default=100, help="epochs to train in all")
    group.add_argument("-b", "--batch-size", type=number(int, 1), default=4096, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=number(float, 0, open_low=True), default=0.3,
                       help="base lr, scaled by --lr-scaling")
    group.add_argument("--lr-scaling", choices=["linear", "sqrt"], default="linear",
                       help="lr × batch/256 (Sec. 2.3), or lr × √batch (App. B.1: small batches, --lr 0.075)")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9, help="LARS momentum")
    group.add_argument("--wd", "--weight-decay", type=number(float), default=1e-6, help="weight decay")
    group.add_argument("--warmup-epochs", type=number(int), default=10, help="linear warm-up, then cosine (Sec. 2.3)")
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", default=f"./runs/{PROG[:-3]}", help="checkpoint.pth.tar and log.txt go here")
    group.add_argument("--resume", default="", help="a checkpoint, or auto: <output-dir>/checkpoint.pth.tar if there")
    group.add_argument("--start-epoch", type=number(int), default=0, help="first epoch (resumed: the checkpoint's)")
    group.add_argument("--seed", type=int, help="makes a CPU run repeatable, and a resumed run bit for bit the same")
    group.add_argument("-p", "--print-freq", type=number(int, 1), default=10, help="a progress line every N steps")
    group.add_argument("--save-every-steps", type=number(int), default=0, help="also save every N steps (0: off)")
    group.add_argument("--compile", action="store_true", help="torch.compile the encoders, in place (same checkpoint)")
    group.add_argument(*GONE, dest="gone", nargs="?", action="append", help=argparse.SUPPRESS)
    group.add_argument("--knn-every", type=number(int), help="kNN monitor every N epochs; None: 1 for built-in data")
    group.add_argument("--amp", action="store_true", help="bf16 autocast for the encoders; losses in float32")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convolutions")
    args = parser.parse_args(argv)
    if args.gone or not args.data:
        parser.error(f"{', '.join(GONE)} are gone: launch with torchrun" if args.gone else "--data is required")
    args.image_size = args.image_size or common.default_image_size(args.data)
    args.stem = args.stem if args.stem != "auto" else "cifar" if args.image_size <= 32 else "imagenet"
    args.knn_every = int(common.labelled(args.data)) if args.knn_every is None else args.knn_every
    return args


def main(argv=None):
    args = parse_args(argv)
    run = Run(args, "simclr")
    per_process = args.batch_size // run.world_size
    if per_process < 2:  # training BN needs two images a channel
        fail(f"-b {args.batch_size} leaves {per_process} image per process, fewer than BatchNorm needs (2)")
    dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root)
    loader = common.build_loader(dataset, per_process, args.workers, run.rank, run.world_size, seed=args.seed)
    knn = common.knn_loaders(args, run.rank, run.world_size) if args.knn_every else None
    run.log(f"=> creating model '{args.arch}'")
    model = SimCLR(partial(resnet, args.arch, args.stem), args.proj_out_dim)
    if run.world_size > 1 and run.device.type == "cuda":  # Sec. 2.2, global BN; SyncBN is GPU-only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(run.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.compile:  # in place: the checkpoint's keys stay the same
        model.encoder.compile()
    # Sec. 2.3: 0.3 × batch/256 (4.8 at 4096); App. B.1: 0.075 × √batch (official learning_rate_scaling)
    args.init_lr = args.lr * (args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size))
    optimizer = LARS(lars_param_groups(model), args.init_lr, args.momentum, args.wd)
    with run.start(model, optimizer) as ddp_model:
        for epoch in range(run.epoch, args.epochs):
            metrics = train_one_epoch(loader, ddp_model, optimizer, epoch, args, run)
            metrics.update(common.knn_monitor(ddp_model, partial(pooled, model.encoder), knn, run.device,
                                              concat_all_gather, args, epoch, run.log))  # what linear_eval.py reads
            run.checkpoint(epoch + 1, 0, metrics)
    run.end(f"=> done: epoch {args.epochs} of {args.epochs}; checkpoint '{run.path}'")


# ------------------------------------------ SCAFFOLD: the same text in every script (tests/test_scaffold.py) --------


def fail(message: str, err: Exception = None):  # with err: its type and the first sentence of its text
    why = f": {type(err).__name__}: {''.join(str(err).splitlines()[:1]).split('. ')[0]}" if err is not None else ""
    raise SystemExit(f"{PROG}: {message}{why}")


def save_checkpoint(state: dict, path: str):  # atomic: a write that fails leaves the previous file whole
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's zip writer on a full disk
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"cannot write '{path}', the previous one is whole", err)


def load_checkpoint(path: str, flag: str, method: str = "") -> dict:  # tensors only: code is never unpickled
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, empty, truncated, not a torch.save file, objects beyond tensors
        fail(f"{flag}: cannot read '{path}' as a tensors-only checkpoint", err)
    if method and (not isinstance(ckpt, dict) or ckpt.get("method") != method):
        fail(f"'{path}' is not a {method} checkpoint (found: {ckpt.get('method') if isinstance(ckpt, dict) else ckpt})")
    return ckpt


class Run:
    """torchrun's rank, world size, device (NCCL with CUDA, else gloo; one process: world size 1) and the checkpoint:
    saved after every epoch, every --save-every-steps, at the step a stop signal arrived (exit 75); --seed: exact."""

    def __init__(self, args, method: str):  # before any work: the process group, the seed, --output-dir, --resume
        self.args, self.method, self.flag, self.epoch, self.step = args, method, False, args.start_epoch, 0
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if args.batch_size % self.world_size:
            fail(f"global batch {args.batch_size} does not divide by the world size {self.world_size}")
        if "RANK" in os.environ:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.device = int(os.environ.get("RANK", 0)), torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = args.seed is None
        if args.seed is not None:
            random.seed(args.seed), torch.manual_seed(args.seed)
        self.path = os.path.join(args.output_dir, "checkpoint.pth.tar")
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=args.output_dir).close()
        except OSError as err:
            fail(f"--output-dir '{args.output_dir}' is not writable", err)
        self.resume = args.resume if args.resume != "auto" else self.path if os.path.isfile(self.path) else ""
        self.resumed = load_checkpoint(self.resume, "--resume", method) if self.resume else None

    @contextlib.contextmanager
    def start(self, model: nn.Module, optimizer, extra=lambda epoch, step: {}):
        """Restores a resumed run (it goes on at run.epoch, run.step), yields the model to train (in DDP under torchrun,
        buffers not sent each step: queues and banks stay identical by construction); inside, signals stop at a step."""
        self.model, self.optimizer, self.extra, ckpt = model, optimizer, extra, self.resumed
        if ckpt:
            try:
                model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
                optimizer.load_state_dict(ckpt["optimizer"])
            except (KeyError, RuntimeError, ValueError) as err:
                fail("the checkpoint does not fit: " + "; ".join(s.strip()[:99] for s in str(err).splitlines()[:4]))
            self.epoch, self.step = ckpt["epoch"], ckpt["step"]
            if self.step and ckpt["args"]["batch_size"] != self.args.batch_size:  # the samples seen: step × batch
                fail(f"the checkpoint stopped mid-epoch with -b {ckpt['args']['batch_size']}: resume it with the same")
            self.log(f"=> loaded checkpoint '{self.resume}' (epoch {self.epoch})")
        sync = next(k for k in ("forward_sync_buffers", "broadcast_buffers") if k in inspect.signature(DDP).parameters)
        handlers = {s: signal.signal(s, lambda *_: setattr(self, "flag", True))
                    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            yield DDP(model, **{sync: False}) if dist.is_initialized() else model
        finally:  # however the run ends, the signals are given back
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def steps(self, loader, epoch: int):
        """(step, batch) of `epoch` from where the run stands; after each step but the last, checkpoint()."""
        start = self.step * (epoch == self.epoch)
        loader.sampler.set_epoch(epoch)
        if start and not isinstance(loader.sampler, common.ResumableSampler):  # a DistributedSampler cannot skip
            fail(f"resuming mid-epoch (epoch {epoch} step {start}) needs common.ResumableSampler")
        loader.sampler.start = start * loader.batch_size  # skip the samples this rank has trained on
        for i, batch in enumerate(loader, start):
            if self.args.seed is not None:  # the step's random numbers (shuffle, NCE noise)
                torch.manual_seed(self.args.seed + 1000 * ((epoch * len(loader) + i) * self.world_size + self.rank + 1))
            yield i, batch
            if i + 1 < len(loader):
                self.checkpoint(epoch, i + 1, sync=self.world_size == 1 or i % self.args.print_freq == 0)

    def checkpoint(self, epoch: int, step: int, metrics: dict = None, sync: bool = True):
        """After `step` steps of `epoch`: save when due, stop if told; after an epoch also log its metrics."""
        stop, every = self.flag and sync, self.args.save_every_steps
        if sync and self.world_size > 1:  # all ranks act on what one knows, synced every --print-freq steps
            stop = torch.tensor(stop, dtype=torch.int32, device=self.device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if self.rank == 0 and (metrics is not None or stop or (every and step % every == 0)):
            save_checkpoint({"method": self.method, "arch": self.args.arch, "epoch": epoch, "step": step, "args":
                             vars(self.args), **self.extra(epoch, step), "optimizer": self.optimizer.state_dict(),
                             "state_dict": {"module." + k: v for k, v in self.model.state_dict().items()}}, self.path)
            if metrics is not None:
                with open(os.path.join(self.args.output_dir, "log.txt"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
        if stop and (step or epoch < self.args.epochs):
            self.end(f"stopped at epoch {epoch} step {step}; continue with --resume auto", 75)  # EX_TEMPFAIL

    def log(self, message: str):
        if self.rank == 0:
            print(message, flush=True)

    def end(self, message: str, status: int = 0):  # every rank leaves together, none before the checkpoint is saved
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        self.log(message)
        if status:
            raise SystemExit(status)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line: saves are atomic, so every checkpoint on disk is whole
        print(f"{PROG}: interrupted; the checkpoints saved so far are intact", file=sys.stderr)
        raise SystemExit(130)  # 128 + SIGINT, as a shell reports it
    except common.DataError as err:  # a missing folder, an unreadable image: one line
        raise SystemExit(f"{PROG}: {err}")
