"""MoCo: Momentum Contrast for Unsupervised Visual Representation Learning. He, Fan, Wu, Xie, Girshick, CVPR 2020,
arXiv:1911.05722; v2: Improved Baselines with Momentum Contrastive Learning. Chen, Fan, Girshick, He, arXiv:2003.04297.

A query encoder learns with InfoNCE (Eq. 1) to pick its own key out of a queue of K keys of earlier batches (Sec. 3.2).
The keys come from a momentum copy of the encoder (Eq. 2), so the queue stays consistent across many steps; shuffling BN
(Sec. 3.3) keeps the model from cheating through batch statistics. v2: an MLP head, blur, a cosine schedule, τ = 0.2.

    python moco.py --data synthetic:2500 -a resnet18 -b 64 --epochs 6 --stem imagenet -j 2 --seed 0 \
        --moco-k 512 --moco-m 0.99 --mlp --moco-t 0.2 --aug-plus --cos --bn-splits 2 --queue-init keys  # CPU
    torchrun --nproc_per_node=8 moco.py --data /imagenet [--mlp --moco-t 0.2 --aug-plus --cos]  # -b: global batch
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 moco.py --data /imagenet
Usage, implementation details against the official code, results: docs/moco.md."""
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

PROG = "moco.py"
RESNETS = [name for name in models.list_models(module=models) if name.startswith(("resnet", "resnext", "wide_resnet"))]
GONE = ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank")  # torchrun's now


# ------------------------------------------------------------------------------------------------------------ METHOD
class MoCo(nn.Module):
    def __init__(self, base_encoder, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.07, mlp=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = base_encoder(num_classes=dim), base_encoder(num_classes=dim)
        if mlp:  # v2: fc → Linear-ReLU-fc (2048-2048-128 for ResNet-50)
            hidden = self.encoder_q.fc.in_features
            for encoder in (self.encoder_q, self.encoder_k):
                encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # the key encoder starts as a copy of the query encoder
            param_k.requires_grad = False  # and is never updated by gradient (Sec. 3.2)
        # dim×K random unit keys; a fixed generator makes them the same on every rank without a broadcast
        queue = torch.randn(dim, K, generator=torch.Generator().manual_seed(0))
        self.register_buffer("queue", F.normalize(queue, dim=0))  # dim=0: each column (a key) of unit length
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """Eq. (2): θk ← m·θk + (1−m)·θq = θk + (1−m)·(θq − θk), one fused op over all parameters."""
        torch._foreach_lerp_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), 1 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor):
        """Sec. 3.2: the keys of the whole global batch replace the oldest; the pointer stays on the device."""
        keys = concat_all_gather(keys)  # global_batch×dim, the same on every rank
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.K
        self.queue.index_copy_(1, idx, keys.t())
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.K)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor):
        """Logits N×(1+K) (the positive in column 0), labels (zeros) and the keys N×dim. The caller enqueues the keys
        after backward: l_neg's graph holds the queue, which an in-place enqueue here would have to copy."""
        q = self.encoder_q(im_q)  # N×dim
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = batch_shuffle(im_k)  # Sec. 3.3, shuffling BN
            k = batch_unshuffle(self.encoder_k(im_k), idx_unshuffle)  # N×dim
        with torch.autocast(q.device.type, enabled=False):  # --amp: similarities and softmax in float32
            q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
            l_pos = (q * k).sum(1, keepdim=True)  # N×1
            l_neg = q @ self.queue  # N×K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # Eq. (1)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device), k


def infonce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (1): L = −log exp(q·k₊/τ) / Σ_{i=0..K} exp(q·k_i/τ), a (K+1)-way cross-entropy with label 0."""
    return F.cross_entropy(logits, labels)


class SplitBatchNorm(nn.BatchNorm2d):
    """BN with separate statistics for sample n mod num_splits (MoCo's CIFAR-10 demo): one process still shuffles BN
    (Sec. 3.3). Running statistics: the splits' mean."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        (N, C, H, W), S = x.shape, self.num_splits
        mean, var = self.running_mean.repeat(S), self.running_var.repeat(S)
        out = F.batch_norm(x.view(N // S, C * S, H, W), mean, var, self.weight.repeat(S), self.bias.repeat(S), True,
                           self.momentum, self.eps).view(N, C, H, W)
        self.running_mean.copy_(mean.view(S, C).mean(0))
        self.running_var.copy_(var.view(S, C).mean(0))
        return out


@torch.no_grad()
def batch_shuffle(x: torch.Tensor):
    """Sec. 3.3, shuffling BN: the key encoder sees the global batch in a random order split over the ranks, so a key's
    BN statistics come from other samples than its query's (one process: a permutation, for --bn-splits)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x_gather = concat_all_gather(x)  # global_batch×C×H×W
    idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
    if dist.is_initialized():
        dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
    return x_gather[idx_shuffle.view(world_size, -1)[rank]], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undoes batch_shuffle: each rank gets back the keys of its own samples, in order."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return concat_all_gather(x)[idx_unshuffle.view(world_size, -1)[rank]]


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:  # all ranks' rows in rank order; one process: the input
    if not dist.is_initialized():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


@torch.no_grad()
def fill_queue(model: MoCo, loader, device):
    """--queue-init keys, not in the paper: the queue ← the initial keys of the first K images (evaluation view). The
    official one starts as random unit keys (builder.py l. 49–51 @7397dfe): the positive is then the only real key."""
    batches = model.K // (loader.batch_size * (dist.get_world_size() if dist.is_initialized() else 1))
    for i, (images, _) in enumerate(loader):
        if i == batches or images.shape[0] < loader.batch_size:  # whole global batches only
            break
        model._dequeue_and_enqueue(F.normalize(model.encoder_k(images.to(device, non_blocking=True)).float(), dim=1))


def build_transform(args) -> common.MultiView:
    if args.aug_plus:  # v2 (arXiv:2003.04297 Sec. 2), SimCLR's recipe with a weaker hue jitter
        aug = [transforms.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
               transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               transforms.RandomGrayscale(p=0.2),
               transforms.RandomApply([common.GaussianBlur((0.1, 2.0))], p=0.5),
               transforms.RandomHorizontalFlip()]
    else:  # v1 (Sec. 4, "Data augmentation")
        aug = [transforms.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
               transforms.RandomGrayscale(p=0.2),
               transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
               transforms.RandomHorizontalFlip()]
    t = transforms.Compose(aug + [transforms.ToTensor(), common.normalize])
    return common.MultiView([t, t])  # query and key: two independent draws


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
        im_q, im_k = (x.to(run.device, non_blocking=True) for x in images)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=args.amp):
            logits, labels, k = model(im_q, im_k)
        loss = infonce_loss(logits, labels)
        acc1, acc5 = common.accuracy(logits, labels, topk=(1, 5))  # the (K+1)-way pretext task
        for meter, value in ((losses, loss), (top1, acc1), (top5, acc5)):
            meter.update(value, im_q.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        getattr(model, "module", model)._dequeue_and_enqueue(k)  # after the step: this batch's keys for the next
        step_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i + 1 == len(loader):  # the meters' only host sync
            if not math.isfinite(losses.avg):
                fail(f"loss is {losses.avg} at epoch {epoch} step {i}; stopped, the last checkpoint is as it was")
            if run.rank == 0:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "acc1": top1.avg, "acc5": top5.avg,
            "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: int, args):
    """Per epoch: cosine (v2), or ×0.1 at each --schedule milestone (v1)."""
    if args.cos:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    else:
        lr = args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr


def number(cast, low=0, high=math.inf, open_low=False):  # argparse type=: out of range is one line naming the flag
    def numeric(text: str):  # its name is in argparse's "invalid numeric value"
        if not low <= cast(text) <= high or (open_low and cast(text) == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}] (got {text})")
        return cast(text)
    return numeric


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="MoCo v1/v2 pre-training",
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
    group.add_argument("--moco-dim", type=number(int, 1), default=128, help="feature dimension")
    group.add_argument("--mlp", action="store_true", help="v2: 2-layer MLP head")
    group.add_argument("--bn-splits", type=number(int, 1), default=1, help="split-batch BN (Sec. 3.3 on one GPU)")
    group = parser.add_argument_group("method")
    group.add_argument("--moco-k", type=number(int, 1), default=65536, help="queue size K, a multiple of -b")
    group.add_argument("--moco-m", type=number(float, 0, 1), default=0.999, help="key-encoder momentum m (Eq. 2)")
    group.add_argument("--moco-t", type=number(float, 0, open_low=True), default=0.07, help="temperature τ (v2: 0.2)")
    group.add_argument("--aug-plus", action="store_true", help="v2 augmentation (blur, weaker hue jitter)")
    group.add_argument("--queue-init", choices=["random", "keys"], default="random", help="keys: of the first K images")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=number(int, 1), default=200, help="epochs to train in all")
    group.add_argument("-b", "--batch-size", type=number(int, 1), default=256, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=number(float, 0, open_low=True), default=0.03, help="lr")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9, help="SGD momentum")
    group.add_argument("--wd", "--weight-decay", type=number(float), default=1e-4, help="weight decay")
    group.add_argument("--schedule", type=number(int), nargs="*", default=[120, 160], help="lr ×0.1 at these epochs")
    group.add_argument("--cos", action="store_true", help="v2: cosine lr schedule")
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
    run = Run(args, "moco")
    per_process = args.batch_size // run.world_size
    if per_process < 2 * args.bn_splits or per_process % args.bn_splits:  # training BN: 2 or more in each split
        fail(f"-b {args.batch_size} leaves {per_process} image per process, fewer than BatchNorm needs (2) in each of "
             f"--bn-splits {args.bn_splits} equal sub-batches")
    if args.moco_k % args.batch_size:  # every enqueue writes a whole global batch (Sec. 3.2)
        fail(f"--moco-k {args.moco_k} is not a multiple of the global batch {args.batch_size}")
    dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root)
    loader = common.build_loader(dataset, per_process, args.workers, run.rank, run.world_size, seed=args.seed)
    knn = common.knn_loaders(args, run.rank, run.world_size) if args.knn_every else None
    run.log(f"=> creating model '{args.arch}'")
    norm_layer = partial(SplitBatchNorm, num_splits=args.bn_splits) if args.bn_splits > 1 else None
    model = MoCo(partial(resnet, args.arch, args.stem, norm_layer=norm_layer), args.moco_dim, args.moco_k, args.moco_m,
                 args.moco_t, args.mlp).to(run.device)
    model = model.to(memory_format=torch.channels_last) if args.channels_last else model
    for encoder in (model.encoder_q, model.encoder_k) if args.compile else ():
        encoder.compile()  # in place: the checkpoint's keys stay the same
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    if args.queue_init == "keys" and not run.resumed:
        plain = common.build_dataset(args.data, "pretrain", common.eval_transform(args.image_size), args.data_root)
        fill_queue(model, common.build_loader(plain, per_process, args.workers, run.rank, run.world_size, False),
                   run.device)
    with run.start(model, optimizer) as ddp_model:
        for epoch in range(run.epoch, args.epochs):
            adjust_learning_rate(optimizer, epoch, args)
            metrics = train_one_epoch(loader, ddp_model, optimizer, epoch, args, run)
            metrics.update(common.knn_monitor(ddp_model, partial(pooled, model.encoder_q), knn, run.device,
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
