"""Linear evaluation (or kNN) of a frozen pre-trained ResNet, MoCo's protocol (He et al. 2020, Sec. 4.1): the backbone
frozen, BN in eval mode, one new linear layer trained on its features of augmented images; top-1/top-5 on the val split.
--protocol simsiam: SimSiam's official main_lincls.py (LARS, cosine). --knn: weighted kNN (Wu et al. 2018, Sec. 3.4).
Reads our checkpoints, official MoCo, SimSiam and MoCo v3, solo-learn, lightly, or a torchvision state_dict; without
--pretrained, random weights with BN statistics of the training images: the floor to beat. --export: for other code.

    python linear_eval.py --data synthetic -a resnet18 --pretrained runs/moco/checkpoint.pth.tar --epochs 10 -b 256
    torchrun --nproc_per_node=4 linear_eval.py --data /imagenet --pretrained checkpoint.pth.tar [--protocol simsiam]
Usage, checkpoint layouts, export: docs/linear_eval.md."""
import argparse
import collections
import contextlib
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as models
import torchvision.transforms as transforms
from torch.nn.parallel import DistributedDataParallel as DDP

import common

PROG = "linear_eval.py"
RESNETS = [name for name in models.list_models(module=models) if name.startswith(("resnet", "resnext", "wide_resnet"))]
GONE = ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank")  # torchrun's now
PROTOCOLS = {  # the defaults of the flags left at None; explicit flags win
    "moco": dict(lr=30.0, batch_size=256, epochs=100, cos=False, schedule=[60, 80]),  # SGD
    # lr: the official main_lincls.py default (facebookresearch/simsiam@a7bc177 l. 53), not App. A's 0.02
    "simsiam": dict(lr=0.1, batch_size=4096, epochs=90, cos=True, schedule=[]),  # LARS
}
# Key prefixes of a backbone, the first holding conv1.weight wins; solo-learn (solo/methods/base.py@9f60a1b l. 193-203)
# and lightly's benchmarks (benchmarks/imagenet/resnet50/simclr.py@c792812 l. 27-29) keep it as `self.backbone`
LAYOUTS = [("module.encoder_q.", "MoCo v1/v2 (ours or official)"), ("module.base_encoder.", "MoCo v3 (official)"),
           ("module.encoder.", "SimSiam (ours or official), SimCLR, BYOL, InsDis"),
           ("backbone.", "solo-learn or lightly benchmarks (Lightning)"), ("encoder.", "solo-learn before 2022"),
           ("", "torchvision ResNet state_dict")]
# lightly's examples: nn.Sequential(*list(resnet.children())[:-1]) (examples/pytorch/simclr.py@f5a9f19 l. 29-31)
LIGHTLY_SEQUENTIAL = [(f"backbone.{i}.", name) for i, name in zip((0, 1, 4, 5, 6, 7), ("conv1.", "bn1.", "layer1.",
                                                                                     "layer2.", "layer3.", "layer4."))]


# ------------------------------------------------------------------------------------------------------------ METHOD
class Backbone(nn.Module):
    """A ResNet without its head; CMC's two encoders (L and ab, or Y and CbCr) side by side, features concatenated."""

    def __init__(self, arch: str, cmc_view: str = "", stem: str = "imagenet"):
        super().__init__()
        self.arch, self.cmc_view, self.stem = arch, cmc_view, stem
        if cmc_view:
            self.encoder_l, self.encoder_ab = resnet(arch, stem, 1), resnet(arch, stem, 2)
        else:
            self.encoder = resnet(arch, stem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # CMC: its L and ab views, features concatenated (Sec. 4.1)
        return torch.cat([self.encoder_l(x[:, :1]), self.encoder_ab(x[:, 1:])], 1) if self.cmc_view else self.encoder(x)


def resnet(arch: str, stem: str, in_channels: int = 3) -> nn.Module:
    """The training scripts' backbone (the "cifar" stem: 3×3 stride-1 conv1, no max-pool), fc the identity."""
    if arch not in RESNETS:  # an "arch" read from a checkpoint; -a itself is checked by argparse
        fail(f"-a {arch} is not a torchvision ResNet: {', '.join(RESNETS)}")
    net = models.__dict__[arch]()
    if in_channels != 3 or stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, *((3, 1, 1) if stem == "cifar" else (7, 2, 3)), bias=False)
    if stem == "cifar":
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def load_backbone(path: str, arch: str, stem: str, log=print):
    """Reads a checkpoint (tensors only), finds the backbone by its key prefix, drops the heads; also its state."""
    ckpt = load_checkpoint(path, "--pretrained")
    if not isinstance(ckpt, dict):
        fail(f"--pretrained: '{path}' holds a {type(ckpt).__name__}, not a checkpoint dict")
    state = ckpt.get("state_dict", ckpt)
    cmc_view = ckpt.get("args", {}).get("view", "Lab") if "module.encoder_l.conv1.weight" in state else ""
    if cmc_view:  # CMC: two encoders, one per view
        layout, renames = f"CMC ({cmc_view})", [(f"module.encoder_{v}.", f"encoder_{v}.") for v in ("l", "ab")]
    elif "backbone.0.weight" in state and "backbone.4.0.conv1.weight" in state:
        layout = "lightly examples (nn.Sequential of torchvision's children)"
        renames = [(prefix, "encoder." + name) for prefix, name in LIGHTLY_SEQUENTIAL]
    else:
        found = [(prefix, name) for prefix, name in LAYOUTS if prefix + "conv1.weight" in state]
        if not found:
            fail(f"'{path}' has no known backbone layout (no ResNet conv1.weight under a known prefix); key prefixes "
                 f"found: {summarise(state)}")
        (prefix, layout), renames = found[0], [(found[0][0], "encoder.")]
    used = {key: new + key[len(prefix):] for key in state for prefix, new in renames
            if key.startswith(prefix) and not key[len(prefix):].startswith("fc.")}  # fc: the head
    backbone_state = {new: state[key] for key, new in used.items()}
    conv1 = next(v for k, v in backbone_state.items() if k.endswith("conv1.weight") and k.count(".") == 2)
    found_stem = "cifar" if conv1.shape[-1] == 3 else "imagenet"  # 3×3: the CIFAR stem, 7×7 torchvision's
    if stem not in ("auto", found_stem):
        fail(f"'{path}' has the {found_stem} stem (conv1 {tuple(conv1.shape)}), not --stem {stem}")
    backbone = Backbone(arch or ckpt.get("arch") or infer_arch(path, backbone_state), cmc_view, found_stem)
    if layout.startswith("solo-learn") and found_stem == "cifar":  # its CIFAR conv1 pads by 2, not 1
        backbone.encoder.conv1.padding, layout = (2, 2), layout + ", conv1 padding 2"  # (solo/methods/base.py l. 200)
    try:
        backbone.load_state_dict(backbone_state)
    except RuntimeError as err:
        fail(f"--pretrained: '{path}' ({layout}) does not fit -a {backbone.arch}: "
             + "; ".join(line.strip()[:99] for line in str(err).splitlines()[:4]))
    ignored = [k for k in state if k not in used]
    log(f"=> loaded '{path}': {layout}, arch {backbone.arch}, {found_stem} stem; used {len(used)} keys "
        f"({', '.join(p for p, _ in renames) or 'no prefix'}), ignored {len(ignored)}: {summarise(ignored)}")
    return backbone, {k: v.clone() for k, v in backbone.state_dict().items()}


def infer_arch(path: str, state: dict) -> str:
    """The ResNet whose tensors have these names and shapes (conv1 aside): for a file without "arch", as --export's."""
    body = {k.split(".", 1)[1]: tuple(v.shape) for k, v in state.items()
            if k.startswith(("encoder.", "encoder_l.")) and not k.split(".", 1)[1].startswith("conv1.")}
    for arch in RESNETS:
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            net = models.__dict__[arch]()
        if body == {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith(("conv1.", "fc."))}:
            return arch
    fail(f"--pretrained: '{path}' has no \"arch\" and its tensors fit no torchvision ResNet; give -a")


def summarise(keys) -> str:  # keys grouped by the module that holds them: 'module.encoder_k.* (320), fc.* (2)'
    groups = collections.Counter(".".join(k.split(".")[:2 if k.startswith("module.") else 1]) + ".*" for k in keys)
    return ", ".join(f"{group} ({n})" for group, n in groups.items()) or "none"


def export(backbone: Backbone, args, log=print):
    """--export: a torchvision state_dict (timm's ResNets use the same names), or for detectron2 a .pkl in its names as
    the official MoCo converter writes it (detection/convert-pretrain-to-detectron2.py@7397dfe l. 21-40): conv1 and
    bn1 the stem, layerN res{N+1}, bnK the norm of convK, downsample.0/.1 the shortcut and its norm."""
    if backbone.cmc_view:
        fail("--export writes one ResNet; a CMC checkpoint holds two encoders")
    if args.export_format == "detectron2" and backbone.stem != "imagenet":
        fail("--export-format detectron2: the CIFAR stem (3×3 conv1, no max-pool) has no detectron2 equivalent")
    state = {k.removeprefix("encoder."): v for k, v in backbone.state_dict().items()}
    if args.export_format == "torchvision":
        save_checkpoint(state, args.export)
        conv1 = backbone.encoder.conv1
        stem = "" if backbone.stem == "imagenet" else (f" after conv1 = nn.Conv2d(3, 64, 3, 1, {conv1.padding[0]}, "
                                                       "bias=False) and maxpool = nn.Identity()")
        log(f"=> exported the backbone to '{args.export}': torchvision.models.{args.arch}() loads it with strict=False "
            f"(only fc.* missing){stem}; --pretrained reads it back")
        return
    model = {}
    for key, value in state.items():
        stage = re.match(r"layer(\d)\.", key)
        key = f"res{int(stage[1]) + 1}.{key[len(stage[0]):]}" if stage else "stem." + key
        key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
        model[key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")] = value.numpy()
    with open(args.export, "wb") as f:  # detectron2 checkpoint/detection_checkpoint.py@06f2892 l. 71-76, 116-124
        pickle.dump({"model": model, "__author__": PROG, "matching_heuristics": True}, f)
    log(f"=> exported the backbone to '{args.export}' in detectron2's names ({len(model)} arrays); its config options "
        f"for -a {args.arch}: docs/linear_eval.md, Export")


def fingerprint(state: dict) -> str:  # sha1 of a backbone's tensors: which weights a probe was trained on
    return hashlib.sha1(b"".join(v.cpu().reshape(-1).view(torch.uint8).numpy().tobytes() for v in state.values())
                        ).hexdigest()


@torch.no_grad()
def larc_(parameters, weight_decay: float, trust: float = 0.001):
    """--protocol simsiam: LARS as SimSiam's main_lincls.py runs it, apex LARC around SGD (simsiam@a7bc177
    l. 226-232; LARC.py@2ec84eb l. 86-102): the gradient plus decay, × η‖w‖/‖g + λw‖ (1 if a norm is 0)."""
    for p in parameters:
        g = p.grad.add_(p, alpha=weight_decay)
        w_norm, g_norm = p.norm(), g.norm()
        g.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust * w_norm / g_norm, 1.0))


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:  # all ranks' rows in rank order; one process: the input
    if not dist.is_initialized():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def train_one_epoch(loader, backbone, classifier, optimizer, epoch: int, args, run) -> dict:
    step_time, data_time = common.AverageMeter("Time", ":6.3f"), common.AverageMeter("Data", ":6.3f")
    losses = common.AverageMeter("Loss", ":.4e")
    top1, top5 = common.AverageMeter("Acc@1", ":6.2f"), common.AverageMeter("Acc@5", ":6.2f")
    progress = common.ProgressMeter(len(loader), [step_time, data_time, losses, top1, top5], f"Epoch: [{epoch}]",
                                    steps_after=(args.epochs - epoch - 1) * len(loader))
    backbone.eval()  # frozen, BN statistics fixed
    end = time.time()
    for i, (images, target) in run.steps(loader, epoch):
        data_time.update(time.time() - end)
        images, target = images.to(run.device, non_blocking=True), target.to(run.device, non_blocking=True)
        with torch.no_grad():
            features = backbone(images)
        output = classifier(features)
        loss = F.cross_entropy(output, target)
        acc1, acc5 = common.accuracy(output, target, topk=(1, 5))
        for meter, value in ((losses, loss), (top1, acc1), (top5, acc5)):
            meter.update(value, images.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.protocol == "simsiam":
            larc_(classifier.parameters(), args.wd)  # then SGD without weight decay: LARS
        optimizer.step()
        step_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i + 1 == len(loader):  # the meters' only host sync
            if not math.isfinite(losses.avg):
                fail(f"loss is {losses.avg} at epoch {epoch} step {i}; stopped, the last checkpoint is as it was")
            if run.rank == 0:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "train_acc1": top1.avg, "lr": optimizer.param_groups[0]["lr"]}


def adjust_learning_rate(optimizer, epoch: int, args):
    """Per epoch: cosine, or ×0.1 at each --schedule milestone."""
    if args.cos:
        lr = args.init_lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    else:
        lr = args.init_lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr


def number(cast, low=0, high=math.inf, open_low=False):  # argparse type=: out of range is one line naming the flag
    def numeric(text: str):  # its name is in argparse's "invalid numeric value"
        if not low <= cast(text) <= high or (open_low and cast(text) == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}] (got {text})")
        return cast(text)
    return numeric


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="linear probe or kNN of a frozen backbone",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", default=argparse.SUPPRESS, help="the same as --data (official spelling)")
    group.add_argument("--data", help="an image folder (ROOT/train/CLASS/*), synthetic[:N], cifar10, cifar100, stl10")
    group.add_argument("--data-root", default="./data", help="where cifar10, cifar100 and stl10 are downloaded")
    group.add_argument("--image-size", type=number(int, 1), help="crop; None: 224, 32 (CIFAR, synthetic), 96 (STL)")
    group.add_argument("-j", "--workers", type=number(int), default=8, help="data-loading workers per process")
    group = parser.add_argument_group("model")
    group.add_argument("-a", "--arch", choices=RESNETS, metavar="ARCH", help="None: the checkpoint's, else resnet50")
    group.add_argument("--pretrained", default="", help="the checkpoint to evaluate; none: random weights")
    group.add_argument("--stem", choices=["auto", "cifar", "imagenet"], default="auto", help="auto: the checkpoint's")
    group.add_argument("--knn", action="store_true", help="weighted kNN instead of a linear layer")
    group.add_argument("--knn-k", type=number(int, 1), default=200, help="kNN: neighbours that vote")
    group.add_argument("--knn-t", type=number(float, 0, open_low=True), default=0.07, help="kNN: vote temperature")
    group.add_argument("--export", default="", help="write the backbone here and exit")
    group.add_argument("--export-format", choices=["torchvision", "detectron2"], default="torchvision",
                       help="torchvision: a state_dict; detectron2: a .pkl of numpy arrays in its names")
    group = parser.add_argument_group("optimisation (None: --protocol's)")
    group.add_argument("--protocol", choices=PROTOCOLS, default="moco", help="sets the defaults below")
    group.add_argument("--epochs", type=number(int, 1), help="epochs to train in all: 100 (moco), 90 (simsiam)")
    group.add_argument("-b", "--batch-size", type=number(int, 1), help="global batch: 256 (moco), 4096 (simsiam)")
    group.add_argument("--lr", "--learning-rate", type=number(float, 0, open_low=True),
                       help="30 (moco), 0.1 × batch/256 (simsiam)")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9, help="SGD or LARS momentum")
    group.add_argument("--wd", "--weight-decay", type=number(float), default=0.0, help="weight decay")
    group.add_argument("--schedule", type=number(int), nargs="*", help="lr ×0.1 at these epochs: 60 80 (moco)")
    group.add_argument("--cos", action="store_true", default=None, help="cosine lr schedule (simsiam)")
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", default=f"./runs/{PROG[:-3]}", help="checkpoint.pth.tar and log.txt go here")
    group.add_argument("--resume", default="", help="a checkpoint, or auto: <output-dir>/checkpoint.pth.tar if there")
    group.add_argument("--start-epoch", type=number(int), default=0, help="first epoch (resumed: the checkpoint's)")
    group.add_argument("--seed", type=int, help="makes a CPU run repeatable, and a resumed run bit for bit the same")
    group.add_argument("-p", "--print-freq", type=number(int, 1), default=10, help="a progress line every N steps")
    group.add_argument("--save-every-steps", type=number(int), default=0, help="also save every N steps (0: off)")
    group.add_argument("--compile", action="store_true", help="torch.compile the encoders, in place (same checkpoint)")
    group.add_argument(*GONE, dest="gone", nargs="?", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gone or not args.data:
        parser.error(f"{', '.join(GONE)} are gone: launch with torchrun" if args.gone else "--data is required")
    if args.export_format == "detectron2" and not args.export.endswith(".pkl"):  # detection_checkpoint.py l. 71
        parser.error("--export-format detectron2 needs --export PATH ending in .pkl, the only pickle detectron2 reads")
    args.image_size = args.image_size or common.default_image_size(args.data)
    for key, value in PROTOCOLS[args.protocol].items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    return args


def main(argv=None):
    args = parse_args(argv)
    run = Run(args, "linear")
    if args.pretrained:
        backbone, reference = load_backbone(args.pretrained, args.arch, args.stem, run.log)
    else:
        stem = ("cifar" if args.image_size <= 32 else "imagenet") if args.stem == "auto" else args.stem
        backbone, reference = Backbone(args.arch or "resnet50", stem=stem), None  # the reference: after the BN pass
        run.log(f"=> creating model '{backbone.arch}' ({stem} stem) with random weights; BN statistics from the data")
    args.arch, args.stem = backbone.arch, backbone.stem  # recorded in the probe's checkpoint, with the weights' sha1:
    args.backbone_sha1 = fingerprint(reference or backbone.state_dict())  # a path may have been overwritten since
    if args.export:
        return export(backbone, args, run.log) if run.rank == 0 else None
    if run.resumed and run.resumed["args"].get("backbone_sha1") != args.backbone_sha1:  # --output-dir is shared
        other = run.resumed["args"]["pretrained"] or "random weights"
        fail(f"--resume: the checkpoint is a probe of another backbone ({other}); give each probe its own --output-dir")
    backbone.to(run.device).eval().requires_grad_(False)
    for encoder in backbone.children() if args.compile else ():
        encoder.compile()  # in place: the sanity check and the fingerprint see the same keys
    last = common.ToColorSpace(backbone.cmc_view) if backbone.cmc_view else common.normalize
    view = common.eval_transform(args.image_size, last)
    augment = transforms.Compose([transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), last])  # main_lincls.py's
    train_set = common.build_dataset(args.data, "train", augment, args.data_root)
    val_set = common.build_dataset(args.data, "val", view, args.data_root, return_index=True)
    per_process, num_classes = args.batch_size // run.world_size, len(train_set.classes)
    if reference is None:  # random weights: BN statistics averaged exactly over the training images and the ranks
        plain = common.build_dataset(args.data, "train", view, args.data_root)  # (torch's 0 and 1 make the floor low)
        with torch.no_grad():
            torch.optim.swa_utils.update_bn(common.build_loader(plain, per_process, args.workers, run.rank,
                                                                run.world_size, False), backbone.train(), run.device)
        for bn in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)) if run.world_size > 1 else ():
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat.div_(run.world_size))
        reference = {k: v.clone() for k, v in backbone.eval().state_dict().items()}

    def features(dataset, split: str):  # every rank embeds its shard, and all end with the whole table
        loader = common.build_loader(dataset, per_process, args.workers, run.rank, run.world_size, train=False)
        progress = common.ProgressMeter(len(loader), [], f"Features ({split}): ") if run.rank == 0 else None
        return common.extract_features(backbone, loader, run.device, concat_all_gather, progress, args.print_freq)

    val_feats, val_labels = features(val_set, "val")
    if args.knn:  # Wu et al. Sec. 3.4, on the training images without augmentation
        train_feats, train_labels = features(common.build_dataset(args.data, "train", view, args.data_root, True),
                                             "train")
        scores = common.knn_classify(F.normalize(val_feats, dim=1), F.normalize(train_feats, dim=1), train_labels,
                                     num_classes, args.knn_k, args.knn_t)
        acc1, acc5 = (float(a) for a in common.accuracy(scores, val_labels, topk=(1, 5)))
        run.end(f"=> kNN (k={args.knn_k}, T={args.knn_t}): Acc@1 {acc1:.2f} Acc@5 {acc5:.2f}")
        return {"knn_acc1": acc1, "knn_acc5": acc5}
    classifier = nn.Linear(val_feats.shape[1], num_classes).to(run.device)
    nn.init.normal_(classifier.weight, std=0.01)  # MoCo main_lincls: N(0, 0.01), bias 0
    nn.init.zeros_(classifier.bias)
    args.init_lr = args.lr * args.batch_size / 256 if args.protocol == "simsiam" else args.lr
    optimizer = torch.optim.SGD(classifier.parameters(), args.init_lr, momentum=args.momentum,
                                weight_decay=0 if args.protocol == "simsiam" else args.wd)  # simsiam: larc_ has it
    best = {"best_acc1": float("-inf"), "best_epoch": -1}  # the official main_lincls.py keeps the best top-1
    best.update({k: run.resumed[k] for k in best} if run.resumed else {})
    loader = common.build_loader(train_set, per_process, args.workers, run.rank, run.world_size, seed=args.seed)
    metrics = dict(best)
    with run.start(classifier, optimizer, lambda epoch, step: best) as ddp_classifier:
        for epoch in range(run.epoch, args.epochs):
            adjust_learning_rate(optimizer, epoch, args)
            metrics = train_one_epoch(loader, backbone, ddp_classifier, optimizer, epoch, args, run)
            with torch.no_grad():  # the backbone is frozen: the validation features were computed once
                acc1, acc5 = (float(a) for a in common.accuracy(classifier(val_feats), val_labels, topk=(1, 5)))
            best.update({"best_acc1": acc1, "best_epoch": epoch} if acc1 > best["best_acc1"] else {})
            metrics.update(acc1=acc1, acc5=acc5, **best)
            run.log(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} (epoch {epoch})")
            run.checkpoint(epoch + 1, 0, metrics)
    if any(not torch.equal(v.cpu(), reference[k].cpu()) for k, v in backbone.state_dict().items()):
        fail("sanity check failed: the backbone changed during linear evaluation")  # MoCo main_lincls' check
    summary = f"Acc@1 {metrics.get('acc1', math.nan):.2f} Acc@5 {metrics.get('acc5', math.nan):.2f} (last epoch)"
    run.end(f"=> linear probe: {summary}; best Acc@1 {best['best_acc1']:.2f} (epoch {best['best_epoch']}) "
            f"(backbone unchanged: sanity check passed); checkpoint '{run.path}'")
    return metrics


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
