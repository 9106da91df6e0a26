"""BYOL: Bootstrap Your Own Latent, a new approach to self-supervised learning. Grill, Strub, Altché, Tallec,
Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot, Kavukcuoglu, Munos, Valko, NeurIPS 2020, arXiv:2006.07733.

An online network (encoder, projector, predictor) learns to predict the target network's projection of another view of
the image (Eq. 2, symmetrised in Sec. 3.1). No negatives: the target is an exponential moving average of the online
weights (Eq. 1) and gets no gradient, and the predictor makes the two asymmetric, which keeps the representation from
collapsing. LARS, large batches, global BN and asymmetric augmentations (Table 6) as in Sec. 3.3.
    python byol.py --data synthetic:2500 -a resnet18 -b 64 --epochs 12 --stem imagenet -j 2 --seed 0 \
        --warmup-epochs 1 --tau-base 0.99 --lr 8 --zero-init-basic  # CPU
    torchrun --nproc_per_node=8 byol.py --data /imagenet [--epochs 1000]  # -b 4096 (global), 300 epochs [Table 1]
    torchrun --nnodes=4 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 byol.py --data /imagenet
Usage, implementation details against the official code, results: docs/byol.md."""
import argparse
import contextlib
import copy
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

PROG = "byol.py"
RESNETS = [name for name in models.list_models(module=models) if name.startswith(("resnet", "resnext", "wide_resnet"))]
GONE = ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank")  # torchrun's now


# ------------------------------------------------------------------------------------------------------------ METHOD
def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Sec. 3.3, Architecture: Linear → BN → ReLU → Linear, for projector and predictor; the last Linear has no
    bias, as in the official code (networks.MLP, with_bias=False)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


class BYOL(nn.Module):
    def __init__(self, base_encoder, dim: int = 256, hidden_dim: int = 4096, zero_init_basic: bool = False):
        super().__init__()
        self.encoder = base_encoder(num_classes=dim)  # online f_θ; its fc becomes the projector g_θ
        # Each bottleneck block starts as the identity, γ = 0 in its last BN, as the official haiku ResNet (dm-haiku
        # @30b2cb5 resnet.py l. 99, BlockV1 bn_2 scale_init=zeros); basic blocks (ResNet-18/34) with zero_init_basic
        for block in self.encoder.modules():
            if isinstance(block, models.resnet.Bottleneck):
                nn.init.zeros_(block.bn3.weight)
            elif isinstance(block, models.resnet.BasicBlock) and zero_init_basic:
                nn.init.zeros_(block.bn2.weight)
        self.encoder.fc = mlp(self.encoder.fc.in_features, hidden_dim, dim)
        self.predictor = mlp(dim, hidden_dim, dim)  # q_θ, online only: the asymmetry (Sec. 3.1)
        self.target_encoder = copy.deepcopy(self.encoder)  # f_ξ and g_ξ start as a copy of θ
        self.target_encoder.requires_grad_(False)  # ξ moves only by Eq. (1), never by gradient

    @torch.no_grad()
    def _update_target_network(self, tau: float):
        """Eq. (1): ξ ← τ·ξ + (1−τ)·θ, one fused op over all parameters. BN statistics are not averaged: the
        target keeps its own, from its own forward passes (as the official code)."""
        torch._foreach_lerp_(list(self.target_encoder.parameters()), list(self.encoder.parameters()), 1 - tau)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Online predictions p1, p2 (q_θ(z_θ) of views 1 and 2) and target projections z1, z2 (z'_ξ), all N×dim.
        Each view is its own BN batch, as in the official code."""
        p1, p2 = self.predictor(self.encoder(x1)), self.predictor(self.encoder(x2))
        with torch.no_grad():  # stop-gradient on the target (Fig. 2)
            z1, z2 = self.target_encoder(x1), self.target_encoder(x2)
        return p1, p2, z1, z2


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ‖p̄ − z̄‖² = 2 − 2·⟨p, z⟩/(‖p‖·‖z‖) per sample (N), in [0, 4]."""
    return 2 - 2 * (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Sec. 3.1: L^BYOL = L + L̃, view 1 predicts view 2's target and view 2 view 1's (the sum, not the mean, as the
    paper and the official code: in [0, 8]), averaged over the batch."""
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


@torch.no_grad()
def prediction_std(p: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse monitor (arXiv:2011.10566 Sec. 4.1) on BYOL's predictions: the std over the batch of
    p/‖p‖₂ per channel, averaged over the d channels: √((1 − c)/d) for a mean pairwise cosine c, 0 when all
    agree."""
    return F.normalize(p, dim=1).std(dim=0).mean()


def target_tau(step: int, total_steps: int, tau_base: float) -> float:
    """Sec. 3.3: τ_k = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2, from τ_base at k = 0 to 1 at k = K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def build_transform(args) -> common.MultiView:
    """Table 6 (App. B): the two views differ only in blur (p 1.0 / 0.1) and solarisation (0.0 / 0.2)."""
    kernel = 2 * int(args.image_size / 20) + 1  # odd, ≈ 10 % of the image side: 23 at 224 (App. B)

    def view(blur_p: float, solarize_p: float) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomResizedCrop(args.image_size, scale=(0.08, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # random order
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            transforms.RandomSolarize(128, p=solarize_p),
            transforms.ToTensor(), common.normalize])
    return common.MultiView([view(1.0, 0.0), view(0.1, 0.2)])


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, arXiv:1708.03888, Alg. 1) with momentum. Groups with lars_exclude (biases and BN, as in
    the official code) get plain SGD with momentum and no weight decay; _foreach ops over all parameters at once."""

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
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def lars_param_groups(model: nn.Module) -> list:
    """Sec. 3.3: biases and BN parameters (the 1-d ones) are excluded from weight decay and from the LARS adaptation;
    the target network is not optimised at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim == 1], "lars_exclude": True, "weight_decay": 0.0}]


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
    losses, taus = common.AverageMeter("Loss", ":.4e"), common.AverageMeter("Tau", ":.6f")
    p_stds = common.AverageMeter("Std(p)", ":.4f")
    progress = common.ProgressMeter(len(loader), [step_time, data_time, losses, p_stds, taus], f"Epoch: [{epoch}]",
                                    steps_after=(args.epochs - epoch - 1) * len(loader))
    model.train()
    end = time.time()
    for i, (images, _) in run.steps(loader, epoch):
        data_time.update(time.time() - end)
        step = epoch * len(loader) + i  # τ and lr are functions of the global step k of K
        adjust_learning_rate(optimizer, step, len(loader), args)
        x1, x2 = (x.to(run.device, non_blocking=True) for x in images)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=args.amp):
            p1, p2, z1, z2 = (t.float() for t in model(x1, x2))
        loss = byol_loss(p1, p2, z1, z2)
        losses.update(loss, x1.shape[0])
        p_stds.update(prediction_std(p1), x1.shape[0])  # this rank's batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tau = target_tau(step, args.epochs * len(loader), args.tau_base)
        getattr(model, "module", model)._update_target_network(tau)  # Eq. (1), after the online step: the new θ
        taus.update(tau)
        step_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i + 1 == len(loader):  # the meters' only host sync
            if not math.isfinite(losses.avg):
                fail(f"loss is {losses.avg} at epoch {epoch} step {i}; stopped, the last checkpoint is as it was")
            if run.rank == 0:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "p_std": p_stds.avg, "tau": tau, "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, step: int, steps_per_epoch: int, args):
    """Per step, as the official schedules.py: linear warm-up from 0 over --warmup-epochs, then cosine decay to 0 over
    the remaining steps (Sec. 3.3)."""
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < warmup:
        lr = args.init_lr * step / warmup
    else:
        lr = args.init_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def number(cast, low=0, high=math.inf, open_low=False):  # argparse type=: out of range is one line naming the flag
    def numeric(text: str):  # its name is in argparse's "invalid numeric value"
        if not low <= cast(text) <= high or (open_low and cast(text) == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}] (got {text})")
        return cast(text)
    return numeric


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="BYOL pre-training",
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
    group.add_argument("--dim", type=number(int, 1), default=256, help="projection size (Sec. 3.3)")
    group.add_argument("--hidden-dim", type=number(int, 1), default=4096, help="projector and predictor hidden size")
    group.add_argument("--zero-init-basic", action="store_true",
                       help="γ = 0 in the last BN of basic blocks (ResNet-18/34) too, as of bottlenecks")
    group = parser.add_argument_group("method")
    group.add_argument("--tau-base", "--base-target-ema", type=number(float, 0, 1), default=0.996,
                       help="target decay rate τ at step 0, raised to 1 by a cosine (Sec. 3.3)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=number(int, 1), default=300, help="epochs to train in all")
    group.add_argument("--warmup-epochs", type=number(int), default=10, help="linear lr warm-up (Sec. 3.3)")
    group.add_argument("-b", "--batch-size", type=number(int, 1), default=4096, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=number(float, 0, open_low=True), default=0.2,
                       help="base lr for batch 256: lr × batch/256")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9, help="LARS momentum")
    group.add_argument("--wd", "--weight-decay", type=number(float), default=1.5e-6, help="weight decay")
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
    run = Run(args, "byol")
    per_process = args.batch_size // run.world_size
    if per_process < 2:  # training BN needs two images a channel
        fail(f"-b {args.batch_size} leaves {per_process} image per process, fewer than BatchNorm needs (2)")
    dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root)
    loader = common.build_loader(dataset, per_process, args.workers, run.rank, run.world_size, seed=args.seed)
    knn = common.knn_loaders(args, run.rank, run.world_size) if args.knn_every else None
    run.log(f"=> creating model '{args.arch}'")
    model = BYOL(partial(resnet, args.arch, args.stem), args.dim, args.hidden_dim, args.zero_init_basic)
    if run.world_size > 1 and run.device.type == "cuda":  # global BN over the whole batch (Sec. 3.3); GPU-only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(run.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    for encoder in (model.encoder, model.target_encoder) if args.compile else ():
        encoder.compile()  # in place: the checkpoint's keys stay the same
    args.init_lr = args.lr * args.batch_size / 256  # Sec. 3.3: lr = 0.2 × batch/256
    optimizer = LARS(lars_param_groups(model), args.init_lr, momentum=args.momentum, weight_decay=args.wd)
    last_tau = lambda epoch, step: {"tau": target_tau(epoch * len(loader) + step - 1, args.epochs * len(loader),  # noqa
                                                      args.tau_base)}  # for reading: τ of the last step
    with run.start(model, optimizer, last_tau) as ddp_model:
        for epoch in range(run.epoch, args.epochs):  # lr and τ are set per step, from the global step
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
