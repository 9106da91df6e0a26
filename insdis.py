"""InsDis: Unsupervised Feature Learning via Non-Parametric Instance Discrimination. Wu, Xiong, Yu, Lin, CVPR 2018,
arXiv:1805.01978.

Every training image is its own class. A memory bank V holds one L2-normalised 128-d feature per image; the encoder is
trained so that an image's feature picks out its own bank row among all N (the non-parametric softmax, Eq. 2), which
NCE approximates with K rows drawn uniformly from the bank (Eq. 4-7) and a normalisation constant Z fixed after the
first batch (Eq. 8); --softmax uses the (K+1)-way cross-entropy. Each step moves the batch's bank rows to its features.
    python insdis.py --data synthetic:2500 -a resnet18 -b 64 --epochs 6 --stem imagenet -j 2 --seed 0 \
        --nce-k 512 --softmax --bank-init features  # CPU
    torchrun --nproc_per_node=4 insdis.py --data /imagenet [--softmax --nce-k 16384]  # paper [CMC repo's better one]
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 insdis.py --data /imagenet
Usage, implementation details against the official code, results: docs/insdis.md."""
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

PROG = "insdis.py"
RESNETS = [name for name in models.list_models(module=models) if name.startswith(("resnet", "resnext", "wide_resnet"))]
GONE = ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank")  # torchrun's now


# ------------------------------------------------------------------------------------------------------------ METHOD
class InsDis(nn.Module):
    def __init__(self, base_encoder, n_data: int, dim: int = 128, K: int = 4096, T: float = 0.07, m: float = 0.5,
                 softmax: bool = False):
        super().__init__()
        self.n_data, self.K, self.T, self.m, self.softmax = n_data, K, T, m, softmax
        self.encoder = base_encoder(num_classes=dim)  # fc is the 128-d projection (Sec. 3, Fig. 2)
        # Sec. 3.1: one feature per training image, random unit vectors at first. Buffers: in the checkpoint, never
        # sent by DDP (kept identical by _update_memory); a fixed generator makes them the same on every rank.
        initial = torch.randn(n_data, dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("memory", F.normalize(initial, dim=1))  # N×d
        self.register_buffer("Z", torch.tensor(-1.0))  # NCE normalisation constant, −1: not estimated yet
        self.Z_known = False  # host-side flag: the buffer is read on the host once per run, not every step

    @torch.no_grad()
    def _estimate_Z(self, s: torch.Tensor):
        """Eq. (8): Z ≈ N·E_j[exp(v_j·f/τ)], estimated on the first batch and then fixed; the batch mean is
        averaged over the ranks, so every rank holds the same Z."""
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
        """v_i ← normalise(m·v_i + (1−m)·f_i) for the images of the whole global batch (Sec. 3.1; m = 0.5 is the
        official code's). Every rank applies the same gathered update, so the banks stay identical, never sent."""
        index, f = concat_all_gather(index), concat_all_gather(f)  # global_batch, global_batch×d
        self.memory.index_copy_(0, index, F.normalize(self.m * self.memory[index] + (1 - self.m) * f, dim=1))

    def forward(self, x: torch.Tensor, index: torch.Tensor):
        """x: B×3×H×W; index: B dataset indices. Returns out (B×(K+1), column 0 the positive: NCE P = exp(s)/Z, or
        with --softmax the logits s), the features f (B×d) and the positives' rows v_i (B×d). The caller updates the
        bank."""
        f = self.encoder(x)  # B×d
        idx = torch.randint(self.n_data, (x.shape[0], self.K + 1), device=x.device)  # uniform noise, per rank
        idx[:, 0] = index  # the positive: the image's own bank row
        weight = self.memory.index_select(0, idx.view(-1)).view(*idx.shape, -1)  # B×(K+1)×d; the bank is not copied
        with torch.autocast(x.device.type, enabled=False):  # --amp: similarities and softmax in float32
            f = F.normalize(f.float(), dim=1)  # float32 like the bank it is written into
            s = torch.bmm(weight, f.unsqueeze(2)).squeeze(2) / self.T  # B×(K+1), v_j·f/τ (Eq. 2)
            if self.softmax:
                return s, f, weight[:, 0]
            self._estimate_Z(s)
            return s.exp() / self.Z, f, weight[:, 0]  # Eq. (4) with Z_i ≈ Z


def nce_loss(P: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE (Eq. 6-7), as the official NCECriterion. P: B×(K+1) = exp(s)/Z, column 0 the positive. With uniform noise Pn
    = 1/N a score came from the data with posterior h = P/(P + K·Pn); L = −mean[log h(pos) + Σ_k log(1 −
    h(noise_k))]."""
    noise = (P.shape[1] - 1) / n_data  # K·Pn
    log_h_positive = (P[:, 0] / (P[:, 0] + noise + eps)).log()  # B
    log_1_minus_h_noise = (noise / (P[:, 1:] + noise + eps)).log()  # B×K
    return -(log_h_positive + log_1_minus_h_noise.sum(1)).mean()


def insdis_loss(out: torch.Tensor, f: torch.Tensor, v: torch.Tensor, n_data: int, softmax: bool, prox_lambda=0.0):
    """NCE, or with --softmax the cross-entropy of the K+1 sampled candidates, label 0 (Eq. 2 on the sample), plus Eq.
    (10)'s proximal term λ‖v_i^(t) − v_i^(t−1)‖² with v_i^(t) = f_i. Also the mean probability of the positive
    (the official `prob`): NCE mode P = exp(s)/Z of column 0, softmax mode its softmax probability."""
    if softmax:
        loss = F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long, device=out.device))
        prob = out.softmax(1)[:, 0].mean()
    else:
        loss, prob = nce_loss(out, n_data), out[:, 0].mean()
    if prox_lambda:
        loss = loss + prox_lambda * (f - v).pow(2).sum(1).mean()
    return loss, prob


@torch.no_grad()
def fill_bank(model: InsDis, loader, device):
    """--bank-init features, not in the paper: row i ← the initial encoder's feature of image i (evaluation view),
    over all ranks. The official bank starts as random unit rows (lemniscate lib/NCEAverage.py l. 83–84 @f7cfe29). A
    last batch of one image per rank is skipped (BN needs two): its rows stay random."""
    for images, _, index in loader:
        if images.shape[0] > 1:
            f = F.normalize(model.encoder(images.to(device, non_blocking=True)).float(), dim=1)
            model.memory.index_copy_(0, concat_all_gather(index.to(device)), concat_all_gather(f))


def build_transform(args) -> transforms.Compose:
    """One view per image, the official lemniscate recipe (which MoCo v1 adopted)."""
    return transforms.Compose([transforms.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
                               transforms.RandomGrayscale(p=0.2), transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(), common.normalize])


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
    losses, probs = common.AverageMeter("Loss", ":.4e"), common.AverageMeter("Prob", ":.4f")
    progress = common.ProgressMeter(len(loader), [step_time, data_time, losses, probs], f"Epoch: [{epoch}]",
                                    steps_after=(args.epochs - epoch - 1) * len(loader))
    model.train()
    n_data = getattr(model, "module", model).n_data
    end = time.time()
    for i, (images, _, index) in run.steps(loader, epoch):
        data_time.update(time.time() - end)
        images, index = images.to(run.device, non_blocking=True), index.to(run.device, non_blocking=True)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=args.amp):
            out, f, v = model(images, index)
        loss, prob = insdis_loss(out, f, v, n_data, args.softmax, args.prox_lambda)
        losses.update(loss, images.shape[0])
        probs.update(prob, images.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        getattr(model, "module", model)._update_memory(index, f.detach())  # after the step: scored with the old rows
        step_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i + 1 == len(loader):  # the meters' only host sync
            if not math.isfinite(losses.avg):
                fail(f"loss is {losses.avg} at epoch {epoch} step {i}; stopped, the last checkpoint is as it was")
            if run.rank == 0:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "prob": probs.avg, "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: int, args):
    """Per epoch: ×0.1 at each --schedule milestone (official: 120 and 160 of 200)."""
    for group in optimizer.param_groups:
        group["lr"] = args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def number(cast, low=0, high=math.inf, open_low=False):  # argparse type=: out of range is one line naming the flag
    def numeric(text: str):  # its name is in argparse's "invalid numeric value"
        if not low <= cast(text) <= high or (open_low and cast(text) == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}] (got {text})")
        return cast(text)
    return numeric


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="InsDis pre-training (memory bank, NCE)",
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
    group.add_argument("--feat-dim", "--feat_dim", type=number(int, 1), default=128, help="feature dimension d")
    group = parser.add_argument_group("method")
    group.add_argument("--nce-k", "--nce_k", type=number(int, 1), default=4096, help="noise samples K per positive")
    group.add_argument("--nce-t", "--nce_t", type=number(float, 0, open_low=True), default=0.07, help="τ (Eq. 2)")
    group.add_argument("--nce-m", "--nce_m", type=number(float, 0, 1), default=0.5, help="bank momentum (Sec. 3.1)")
    group.add_argument("--softmax", action="store_true", help="(K+1)-way softmax cross-entropy instead of NCE")
    group.add_argument("--prox-lambda", type=number(float), default=0.0, help="proximal term λ (Eq. 10); 0: off")
    group.add_argument("--bank-init", choices=["random", "features"], default="random",
                       help="random: random unit rows (official); features: the initial encoder's (short runs)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=number(int, 1), default=200, help="epochs to train in all")
    group.add_argument("-b", "--batch-size", type=number(int, 1), default=256, help="global batch over all processes")
    group.add_argument("--lr", "--learning-rate", type=number(float, 0, open_low=True), default=0.03, help="lr")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9, help="SGD momentum")
    group.add_argument("--wd", "--weight-decay", type=number(float), default=1e-4, help="weight decay")
    group.add_argument("--schedule", type=number(int), nargs="*", default=[120, 160], help="lr ×0.1 at these epochs")
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
    run = Run(args, "insdis")
    per_process = args.batch_size // run.world_size
    if per_process < 2:  # training BN needs two images a channel
        fail(f"-b {args.batch_size} leaves {per_process} image per process, fewer than BatchNorm needs (2)")
    dataset = common.build_dataset(args.data, "pretrain", build_transform(args), args.data_root, return_index=True)
    if args.nce_k >= len(dataset):  # the K noise rows are drawn from the bank, one row per image
        fail(f"--nce-k {args.nce_k} must be smaller than the memory bank ({len(dataset)} images in '{args.data}')")
    loader = common.build_loader(dataset, per_process, args.workers, run.rank, run.world_size, seed=args.seed)
    knn = common.knn_loaders(args, run.rank, run.world_size) if args.knn_every else None
    run.log(f"=> creating model '{args.arch}'")
    model = InsDis(partial(resnet, args.arch, args.stem), len(dataset), args.feat_dim, args.nce_k, args.nce_t,
                   args.nce_m, args.softmax)
    model = model.to(run.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.compile:  # in place: the checkpoint's keys stay the same
        model.encoder.compile()
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    if args.bank_init == "features" and not run.resumed:
        view = common.eval_transform(args.image_size)
        plain = common.build_dataset(args.data, "pretrain", view, args.data_root, return_index=True)
        fill_bank(model, common.build_loader(plain, per_process, args.workers, run.rank, run.world_size, False),
                  run.device)
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
