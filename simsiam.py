"""SimSiam: Exploring Simple Siamese Representation Learning. Chen, He, CVPR 2021, arXiv:2011.10566.

One encoder f (a ResNet whose fc is a 3-layer projection MLP) sees two views of an image; a prediction MLP h maps one
view's z to the other's, minimising the negative cosine D (Eq. 1), symmetrised (Eq. 2). No negatives, no momentum
encoder, no large batch: the stop-gradient on z (Eq. 3-4) alone keeps the outputs from collapsing to a constant
(Sec. 4.1, Fig. 2), which the logged std of the L2-normalised z watches. SGD, cosine schedule, MoCo v2 augmentation.

    python simsiam.py --data synthetic:2500 -a resnet18 -b 64 --epochs 24 --stem imagenet -j 2 --seed 0 \
        --fix-pred-lr --lr 1 --wd 5e-4  # CPU
    torchrun --nproc_per_node=8 simsiam.py --data /imagenet [--fix-pred-lr]  # -b: global batch, lr × -b/256
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 simsiam.py --data /imagenet
Usage, implementation details against the official code, results: docs/simsiam.md."""
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

PROG = "simsiam.py"
RESNETS = [name for name in models.list_models(module=models) if name.startswith(("resnet", "resnext", "wide_resnet"))]
GONE = ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank")  # torchrun's now


# ------------------------------------------------------------------------------------------------------------ METHOD
class SimSiam(nn.Module):
    def __init__(self, base_encoder, dim: int = 2048, pred_dim: int = 512):
        super().__init__()
        # zero_init_residual: each residual block starts as the identity (official builder.py)
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        prev_dim = self.encoder.fc.in_features  # 2048 for ResNet-50
        self.encoder.fc.bias.requires_grad = False  # a bias before BN does nothing (official builder.py)
        # Sec. 3, projection MLP (the fc of f): 3 layers with BN on every fc, the output fc included
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            self.encoder.fc, nn.BatchNorm1d(dim, affine=False))  # output: BN without affine, no ReLU
        # Sec. 3, prediction MLP h: a d → pred_dim → d bottleneck, BN on the hidden layer only (Sec. 4.4)
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """p1, p2 = h(f(x1)), h(f(x2)) and z1, z2 = f(x1), f(x2), all N×dim. Each view is its own BN batch, as in the
        official code. z keeps its graph: the loss applies the stop-gradient."""
        z1, z2 = self.encoder(x1), self.encoder(x2)
        return self.predictor(z1), self.predictor(z2), z1, z2


def D(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. (3): D(p, stopgrad(z)), D of Eq. (1) being the negative cosine similarity −p/‖p‖₂·z/‖z‖₂,
    averaged over the batch as in Algorithm 1. z is a constant: no gradient reaches the branch that made it."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. (4): L = D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2, the symmetrised loss (Eq. 2); minimum −1."""
    return D(p1, z2) / 2 + D(p2, z1) / 2


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Sec. 4.1, Fig. 2 (middle): the std over the batch of z/‖z‖₂ per channel, averaged over the d channels: ≈
    1/√d for healthy outputs (exactly 1/√d for isotropic Gaussian z), 0 when every sample maps to one direction
    (collapse)."""
    return F.normalize(z, dim=1).std(dim=0).mean()


def build_transform(args) -> common.MultiView:
    """MoCo v2's augmentation (App. A; arXiv:2003.04297 Sec. 2), as the official main_simsiam.py."""
    t = transforms.Compose([transforms.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
                            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                            transforms.RandomGrayscale(p=0.2),
                            transforms.RandomApply([common.GaussianBlur((0.1, 2.0))], p=0.5),
                            transforms.RandomHorizontalFlip(), transforms.ToTensor(), common.normalize])
    return common.MultiView([t, t])  # x1 and x2: two independent draws


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
    losses, z_stds = common.AverageMeter("Loss", ":.4f"), common.AverageMeter("Std(z)", ":.4f")
    progress = common.ProgressMeter(len(loader), [step_time, data_time, losses, z_stds], f"Epoch: [{epoch}]",
                                    steps_after=(args.epochs - epoch - 1) * len(loader))
    model.train()
    end = time.time()
    for i, (images, _) in run.steps(loader, epoch):
        data_time.update(time.time() - end)
        x1, x2 = (x.to(run.device, non_blocking=True) for x in images)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=args.amp):
            p1, p2, z1, z2 = (t.float() for t in model(x1, x2))
        loss = simsiam_loss(p1, p2, z1, z2)
        losses.update(loss, x1.shape[0])
        z_stds.update(collapse_std(z1), x1.shape[0])  # this rank's batch
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
    return {"epoch": epoch, "loss": losses.avg, "z_std": z_stds.avg, "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: int, args):
    """Per epoch, cosine decay from init_lr to 0 (Sec. 3); a group marked fix_lr (the predictor with --fix-pred-lr,
    Sec. 4.2) stays at init_lr."""
    lr = args.init_lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    for group in optimizer.param_groups:
        group["lr"] = args.init_lr if group["fix_lr"] else lr


def number(cast, low=0, high=math.inf, open_low=False):  # argparse type=: out of range is one line naming the flag
    def numeric(text: str):  # its name is in argparse's "invalid numeric value"
        if not low <= cast(text) <= high or (open_low and cast(text) == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}] (got {text})")
        return cast(text)
    return numeric


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="SimSiam pre-training",
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
    group.add_argument("--dim", type=number(int, 1), default=2048, help="projector and predictor output d (Sec. 3)")
    group.add_argument("--pred-dim", type=number(int, 1), default=512, help="predictor bottleneck (Sec. 3)")
    group = parser.add_argument_group("method")
    group.add_argument("--fix-pred-lr", action="store_true", help="predictor lr not decayed (Sec. 4.2, Table 1(c))")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=number(int, 1), default=100, help="epochs to train in all")
    group.add_argument("-b", "--batch-size", type=number(int, 1), default=512, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=number(float, 0, open_low=True), default=0.05,
                       help="base lr, scaled: lr × batch/256")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9, help="SGD momentum")
    group.add_argument("--wd", "--weight-decay", type=number(float), default=1e-4, help="weight decay")
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
    run = Run(args, "simsiam")
    per_process = args.batch_size // run.world_size
    if per_process < 2:  # training BN needs two images a channel
        fail(f"-b {args.batch_size} leaves {per_process} image per process, fewer than BatchNorm needs (2)")
    dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root)
    loader = common.build_loader(dataset, per_process, args.workers, run.rank, run.world_size, seed=args.seed)
    knn = common.knn_loaders(args, run.rank, run.world_size) if args.knn_every else None
    run.log(f"=> creating model '{args.arch}'")
    model = SimSiam(partial(resnet, args.arch, args.stem), args.dim, args.pred_dim)
    if run.world_size > 1 and run.device.type == "cuda":  # BN over the global batch (Sec. 3); SyncBN is GPU-only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(run.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.compile:  # in place: the checkpoint's keys stay the same
        model.encoder.compile()
    args.init_lr = args.lr * args.batch_size / 256  # Sec. 3: lr × BatchSize/256
    optimizer = torch.optim.SGD([{"params": model.encoder.parameters(), "fix_lr": False},
                                 {"params": model.predictor.parameters(), "fix_lr": args.fix_pred_lr}],
                                args.init_lr, momentum=args.momentum, weight_decay=args.wd)
    with run.start(model, optimizer) as ddp_model:
        for epoch in range(run.epoch, args.epochs):
            adjust_learning_rate(optimizer, epoch, args)
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
