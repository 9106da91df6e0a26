"""Linear evaluation (and kNN) of a frozen pre-trained ResNet.

The protocol of MoCo (He et al. 2020, Sec. 4.1, after Zhang et al. 2016 / Wu et al. 2018): freeze
the backbone with BN in eval mode, train one new linear layer on its pooled features with
augmented images, report top-1/top-5 on the validation split, of the last and of the best epoch
(the official scripts keep the best). `--protocol simsiam` switches to SimSiam's (Chen & He 2021,
App. A) as its official main_lincls.py runs it: LARS on every parameter, lr 0.1 × batch/256 (the
paper says 0.02), batch 4096, 90 epochs, cosine.
`--knn` trains nothing: a weighted kNN on L2-normalised features (Wu et al. 2018, Sec. 3.4).

Checkpoints: any of ours (the method is read from the keys), official MoCo v1/v2
(`module.encoder_q.`), SimSiam (`module.encoder.`), MoCo v3 (`module.base_encoder.`), solo-learn and
lightly (`backbone.`, lightly's nn.Sequential `backbone.0.`…), or a plain torchvision ResNet state_dict.
Without --pretrained the backbone is randomly initialised, its BN statistics estimated on the training
images (no weight changes): the baseline every pre-training must beat.
`--export` writes the backbone for torchvision (timm's ResNets use the same names) or, with
`--export-format detectron2`, for detectron2.

    python linear_eval.py --data synthetic -a resnet18 --pretrained runs/moco/checkpoint.pth.tar --epochs 10 -b 256
    torchrun --nproc_per_node=4 linear_eval.py --data /imagenet --pretrained checkpoint.pth.tar
    torchrun --nproc_per_node=4 linear_eval.py --data /imagenet --pretrained simsiam.pth.tar --protocol simsiam
    python linear_eval.py --data synthetic --pretrained checkpoint.pth.tar --export r50.pkl --export-format detectron2

Documentation: docs/linear_eval.md (usage, implementation details against the official code, results, metrics).
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
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

import common

PROG = "linear_eval.py"
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",  # -a: the torchvision
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]  # builders of a ResNet
PROTOCOLS = {  # defaults per protocol; explicit flags win
    "moco": dict(lr=30.0, batch_size=256, epochs=100, wd=0.0, optimizer="sgd", cos=False, schedule=[60, 80]),
    # lr: the official main_lincls.py default (facebookresearch/simsiam@a7bc177 l. 53), not App. A's 0.02;
    # the maintainers used 0.1 for the released models (simsiam issue #13)
    "simsiam": dict(lr=0.1, batch_size=4096, epochs=90, wd=0.0, optimizer="lars", cos=True, schedule=[]),
}
# Key prefixes of a backbone in known checkpoint layouts; the first that holds `conv1.weight` wins.
LAYOUTS = [("module.encoder_q.", "MoCo v1/v2 (ours or official)"),
           ("module.base_encoder.", "MoCo v3 ResNet (official)"),
           ("module.encoder.", "SimSiam (ours or official), SimCLR, BYOL, InsDis"),
           # Lightning `state_dict`s of a module whose torchvision ResNet is `self.backbone`: solo-learn
           # (vturrisi/solo-learn solo/methods/base.py@9f60a1b l. 193-203; its main_linear.py l. 74-84 reads it
           # back the same way) and lightly's benchmarks (lightly-ai/lightly
           # benchmarks/imagenet/resnet50/simclr.py@c792812 l. 27-29; lightly issue #1475)
           ("backbone.", "solo-learn or lightly benchmarks (Lightning)"),
           # solo-learn called it `encoder` until Dec 2021 (main_linear.py@9f60a1b l. 76-80 still renames it)
           ("encoder.", "solo-learn before 2022"),
           ("", "torchvision ResNet state_dict")]
# lightly's examples keep `backbone = nn.Sequential(*list(resnet.children())[:-1])` (lightly-ai/lightly
# examples/pytorch/simclr.py@f5a9f19 l. 29-31): torchvision's children by index; 2 (relu), 3 (max-pool)
# and 8 (avg-pool) hold no tensors
LIGHTLY_SEQUENTIAL = [("backbone.0.", "conv1."), ("backbone.1.", "bn1."), ("backbone.4.", "layer1."),
                      ("backbone.5.", "layer2."), ("backbone.6.", "layer3."), ("backbone.7.", "layer4.")]
EXPORT_FORMATS = ("torchvision", "detectron2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="linear probe / kNN of a frozen backbone",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")  # SCAFFOLD
    group.add_argument("data_pos", nargs="?", metavar="DATA", help="same as --data (official spelling)")
    group.add_argument("--data", help="image folder with train/ and val/, or synthetic[:N], cifar10, cifar100, stl10")
    group.add_argument("--data-root", default="./data", help="download folder for torchvision datasets")
    group.add_argument("--image-size", type=int, default=None, help="crop size; None: 224, 32 for CIFAR/synthetic, 96 for STL-10")
    group.add_argument("-j", "--workers", type=int, default=8, help="data-loading workers per process")
    group = parser.add_argument_group("model")
    group.add_argument("-a", "--arch", default=None, help="torchvision ResNet; None: the checkpoint's (or the one its tensors fit), resnet50 without --pretrained")
    group.add_argument("--pretrained", default="", help="checkpoint to evaluate; none = random init")
    group.add_argument("--stem", choices=["auto", "cifar", "imagenet"], default="auto",
                       help="ResNet stem; auto: the checkpoint's (from conv1's kernel), or cifar (3×3 conv1, "
                            "no max-pool) for crops ≤ 32 px with random weights")
    group.add_argument("--knn", action="store_true", help="weighted kNN instead of a linear layer")
    group.add_argument("--knn-k", type=int, default=200, help="kNN: neighbours that vote")
    group.add_argument("--knn-t", type=float, default=0.07, help="kNN: vote temperature")
    group.add_argument("--export", default="", help="write the backbone as a torchvision state_dict here and exit")
    group.add_argument("--export-format", choices=EXPORT_FORMATS, default="torchvision",
                       help="torchvision: a state_dict (timm's ResNets use the same names); detectron2: a .pkl "
                            "of numpy arrays in detectron2's ResNet names")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--protocol", choices=PROTOCOLS, default="moco", help="sets the defaults of the flags below whose default is None")
    group.add_argument("--epochs", type=int, help="epochs to train in all; None: 100 (moco), 90 (simsiam)")
    group.add_argument("-b", "--batch-size", type=int, help="global batch over all processes; None: 256 (moco), 4096 (simsiam)")
    group.add_argument("--lr", "--learning-rate", type=float,
                       help="lr (simsiam protocol: for batch 256, scaled); None: 30 (moco), 0.1 (simsiam)")
    group.add_argument("--momentum", type=float, default=0.9, help="optimizer momentum")
    group.add_argument("--wd", "--weight-decay", type=float, help="weight decay; None: 0 in both protocols")
    group.add_argument("--schedule", type=int, nargs="*", help="lr ×0.1 at these epochs; None: 60 80 (moco), none (simsiam)")
    group.add_argument("--cos", action="store_true", default=None, help="cosine lr schedule; None: off (moco), on (simsiam)")
    group = parser.add_argument_group("run")  # SCAFFOLD
    group.add_argument("--output-dir", default="./runs/linear", help="checkpoint.pth.tar and log.txt go here")
    group.add_argument("--resume", default="", help="checkpoint path, or 'auto' for <output-dir>/checkpoint.pth.tar")
    group.add_argument("--start-epoch", type=int, default=0, help="first epoch (--resume sets it)")
    group.add_argument("--seed", type=int, default=None, help="makes a CPU run repeatable, resume included")
    group.add_argument("-p", "--print-freq", type=int, default=10, help="a progress line every N steps")
    group.add_argument("--save-every-steps", type=int, default=0,
                       help="also write the checkpoint every N steps of an epoch (0: at epoch ends and on a stop signal)")
    group.add_argument("--save-every-minutes", type=float, default=0,
                       help="also write it every M minutes (under torchrun checked every --print-freq steps; 0: off)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the frozen ResNet(s), in place (state_dict keys unchanged); the first batches compile")
    for gone in ("--dist-url", "--multiprocessing-distributed", "--gpu", "--world-size", "--rank"):
        group.add_argument(gone, action=GoneFlag, nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data = args.data or args.data_pos
    if not args.data:
        parser.error("--data is required")
    args.image_size = common.default_image_size(args.data) if args.image_size is None else args.image_size
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.export_format == "detectron2" and not args.export.endswith(".pkl"):  # detection_checkpoint.py l. 71
        parser.error("--export-format detectron2 needs --export PATH ending in .pkl: detectron2 reads a "
                     "pickle only from a .pkl file")
    check_ranges(parser, args, [  # ResNets run at any crop ≥ 1 px with either stem (measured)
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
        ("-a/--arch", args.arch in (None, *RESNETS), "a torchvision ResNet: " + ", ".join(RESNETS)),
        ("--knn-k", args.knn_k >= 1, ">= 1"),
        ("--knn-t", args.knn_t > 0, "> 0"),
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
class Backbone(nn.Module):
    """A ResNet without its fc; CMC's two encoders (L and ab, or Y and CbCr) side by side, their
    features concatenated (CMC Sec. 4.1). Its input is what `eval_transform` produces."""

    def __init__(self, arch: str, cmc_view: str = "", stem: str = "imagenet"):
        super().__init__()
        self.arch, self.cmc_view, self.stem = arch, cmc_view, stem
        if cmc_view:
            self.encoder_l, self.encoder_ab = resnet(arch, 1, stem), resnet(arch, 2, stem)
        else:
            self.encoder = resnet(arch, 3, stem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cmc_view:
            return torch.cat([self.encoder_l(x[:, :1]), self.encoder_ab(x[:, 1:])], dim=1)
        return self.encoder(x)


def resnet(arch: str, in_channels: int, stem: str) -> nn.Module:
    """The training scripts' backbone: stem "cifar" = 3×3 stride-1 conv1 and no max-pool."""
    if arch not in RESNETS:  # an "arch" read from a checkpoint; -a itself is checked in parse_args
        fail(f"-a {arch} is not a torchvision ResNet: {', '.join(RESNETS)}")
    net = models.__dict__[arch]()
    if in_channels != 3 or stem == "cifar":
        kernel, stride, padding = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, padding, bias=False)
    if stem == "cifar":
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def stem_of(conv1_weight: torch.Tensor) -> str:
    """A checkpoint's stem, from conv1's kernel: 3×3 is the CIFAR stem, 7×7 torchvision's."""
    return "cifar" if conv1_weight.shape[-1] == 3 else "imagenet"


def load_backbone(path: str, arch: str, is_main: bool, stem: str = "auto"):
    """Reads a checkpoint (tensors only), finds the backbone by its key prefix, drops the heads.
    Returns the backbone and the state it was loaded from (for the sanity check)."""
    ckpt = read_checkpoint(path, "--pretrained")
    if not isinstance(ckpt, dict):
        fail(f"--pretrained: '{path}' holds a {type(ckpt).__name__}, not a checkpoint dict")
    state = ckpt.get("state_dict", ckpt)
    if "module.encoder_l.conv1.weight" in state:  # CMC: two encoders, one per view
        cmc_view = ckpt.get("args", {}).get("view", "Lab")
        layout, renames = f"CMC ({cmc_view})", [("module.encoder_l.", "encoder_l."), ("module.encoder_ab.", "encoder_ab.")]
    elif "backbone.0.weight" in state and "backbone.4.0.conv1.weight" in state:
        cmc_view, layout = "", "lightly examples (nn.Sequential of torchvision's children)"
        renames = [(prefix, "encoder." + name) for prefix, name in LIGHTLY_SEQUENTIAL]
    else:
        found = [(prefix, name) for prefix, name in LAYOUTS if prefix + "conv1.weight" in state]
        if not found:
            fail(f"'{path}' has no known backbone layout (no ResNet conv1.weight under a known prefix); "
                 f"key prefixes found: {summarise(state)}")
        cmc_view, (prefix, layout) = "", found[0]
        renames = [(prefix, "encoder.")]
    used, backbone_state = set(), {}
    for key, value in state.items():
        for prefix, new in renames:
            if key.startswith(prefix) and not key[len(prefix):].startswith("fc."):  # fc = the head
                backbone_state[new + key[len(prefix):]] = value
                used.add(key)
    ignored = [k for k in state if k not in used]
    arch = arch or ckpt.get("arch") or infer_arch(path, backbone_state)
    conv1 = next(v for k, v in backbone_state.items() if k.endswith("conv1.weight") and k.count(".") == 2)
    if stem not in ("auto", stem_of(conv1)):
        fail(f"'{path}' has the {stem_of(conv1)} stem (conv1 {tuple(conv1.shape)}), not --stem {stem}")
    backbone = Backbone(arch, cmc_view, stem_of(conv1))
    if layout.startswith("solo-learn") and stem_of(conv1) == "cifar":
        # solo-learn's CIFAR conv1 pads by 2, not 1 (solo/methods/base.py@9f60a1b l. 200-202, main_linear.py l. 68):
        # the same weights, other features. lightly's benchmarks under `backbone.` are ImageNet-stem only.
        backbone.encoder.conv1.padding = (2, 2)
        layout += ", conv1 padding 2"
    why = mismatch(backbone.state_dict(), backbone_state)
    if why:
        fail(f"--pretrained: '{path}' ({layout}) does not fit -a {arch}: {why}")
    backbone.load_state_dict(backbone_state)
    if is_main:
        print(f"=> loaded '{path}': {layout}, arch {arch}, {stem_of(conv1)} stem; used {len(used)} keys "
              f"({', '.join(p for p, _ in renames) or 'no prefix'}), ignored {len(ignored)}: "
              f"{summarise(ignored)}", flush=True)
    return backbone, {k: v.clone() for k, v in backbone.state_dict().items()}


def infer_arch(path: str, state: dict) -> str:
    """The torchvision ResNet whose tensors have these names and shapes (conv1 aside: the stems differ), for
    a checkpoint without an "arch" field: a plain state_dict, such as one --export wrote."""
    body = {k.split(".", 1)[1]: tuple(v.shape) for k, v in state.items()
            if k.startswith(("encoder.", "encoder_l.")) and not k.split(".", 1)[1].startswith("conv1.")}
    for arch in RESNETS:
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            net = models.__dict__[arch]()
        if body == {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith(("conv1.", "fc."))}:
            return arch
    fail(f"--pretrained: '{path}' has no \"arch\" and its tensors fit no torchvision ResNet; give -a")


def summarise(keys) -> str:
    """Keys grouped by the module that holds them: 'module.encoder_k.* (320)', 'projector.* (6)'."""
    groups = {}
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "module" else 1  # DDP's `module.` says nothing about the owner
        group = ".".join(parts[:depth]) + ".*" if len(parts) > depth else key
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in groups.items()) or "none"


def detectron2_name(key: str) -> str:
    """A torchvision ResNet key in detectron2's ResNet names, the renaming of the official MoCo converter
    (facebookresearch/moco detection/convert-pretrain-to-detectron2.py@7397dfe l. 21-35): conv1/bn1 are the
    stem, layerN is res{N+1}, bnK the norm of convK, downsample.0/.1 the shortcut and its norm: the names of
    detectron2's BasicStem, BasicBlock (R18/R34) and BottleneckBlock (modeling/backbone/resnet.py@8f22855
    l. 330, 32, 100; stages named res2-res5 at l. 403).
    'layer2.0.downsample.1.running_mean' -> 'res3.0.shortcut.norm.running_mean'."""
    stage = re.match(r"layer(\d)\.", key)
    key = f"res{int(stage[1]) + 1}.{key[len(stage[0]):]}" if stage else "stem." + key
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    return key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")


def export_detectron2(backbone: Backbone, path: str, is_main: bool):
    """Writes what detectron2's DetectionCheckpointer reads from a .pkl, as the MoCo converter does (l. 37-40
    there): {"model": {name: numpy array}, "__author__", "matching_heuristics": True} (detectron2
    checkpoint/detection_checkpoint.py@06f2892 l. 71-76, 116-124: the heuristics match our names to the model's
    by suffix). Plain pickle, no torch objects."""
    if backbone.stem != "imagenet":
        fail("--export-format detectron2: the CIFAR stem (3×3 conv1, no max-pool) has no detectron2 equivalent")
    if not is_main:
        return
    # numpy arrays as detectron2's model zoo files hold; numpy comes with torchvision (a requirement of it)
    model = {detectron2_name(k.removeprefix("encoder.")): v.numpy() for k, v in backbone.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": PROG, "matching_heuristics": True}, f)
    depth, conv2 = int(re.search(r"\d+", backbone.arch)[0]), backbone.encoder.layer1[0].conv2
    opts = [f"MODEL.WEIGHTS {path}", f"MODEL.RESNETS.DEPTH {depth}"]
    if depth < 50:  # BasicBlock; detectron2 asserts RES2_OUT_CHANNELS 64 for R18/R34 (resnet.py l. 654-655)
        opts.append("MODEL.RESNETS.RES2_OUT_CHANNELS 64")
    else:  # torchvision strides the 3×3 conv, and ResNeXt/wide ResNets set the bottleneck width
        opts.append("MODEL.RESNETS.STRIDE_IN_1X1 False")
        if (conv2.groups, conv2.out_channels // conv2.groups) != (1, 64):
            opts.append(f"MODEL.RESNETS.NUM_GROUPS {conv2.groups} "
                        f"MODEL.RESNETS.WIDTH_PER_GROUP {conv2.out_channels // conv2.groups}")
    mean, std = ([round(255 * c, 3) for c in v] for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    opts.append(f'INPUT.FORMAT RGB MODEL.PIXEL_MEAN "{mean}" MODEL.PIXEL_STD "{std}"')
    print(f"=> exported the backbone to '{path}' in detectron2's names ({len(model)} arrays); its config "
          f"needs: {' '.join(opts)}", flush=True)


@torch.no_grad()
def estimate_bn_statistics(backbone: nn.Module, loader, device):
    """The random floor's BN statistics: one pass over the training images (evaluation view) in train
    mode, the exact average over all batches (momentum None), averaged over the ranks; no weight changes.
    Every pre-trained backbone carries statistics of its data; with torch's initial mean 0 and variance 1
    instead, the random floor is lower than random weights are (measured, ResNet-18 at 32 px on
    synthetic:2500, kNN 59.6 % against 66.0 %), and a run that only updated its BN statistics would
    seem to have learned."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats(), setattr(bn, "momentum", None)
    backbone.to(device).train()
    try:
        for images, _ in loader:
            backbone(images.to(device, non_blocking=True))
    except common.DataError as err:
        fail(common.data_error_message(err))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        if dist.is_initialized():
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce(buf), buf.div_(dist.get_world_size())
    backbone.eval()
def fingerprint(state: dict) -> str:
    """sha1 of a backbone's tensors (names, dtypes, bytes): which weights a probe was trained on."""
    digest = hashlib.sha1()
    for key, value in state.items():
        digest.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_backbone(path: str, old: dict, args):
    """--resume: the default --output-dir is shared by every probe; continuing one on another backbone
    would mix two runs in one checkpoint and log."""
    same = (old["backbone_sha1"] == args.backbone_sha1 if "backbone_sha1" in old
            else old.get("pretrained") == args.pretrained)  # a probe written before fingerprints
    if not same:
        seed = "" if args.pretrained else "; random weights repeat only with the same --seed"
        fail(f"--resume: '{path}' is a probe of another backbone ({old.get('pretrained') or 'random weights'}, "
             f"sha1 {old.get('backbone_sha1', '?')[:12]}), not of {args.pretrained or 'random weights'} "
             f"(sha1 {args.backbone_sha1[:12]}); give each probe its own --output-dir{seed}")


def features(backbone: nn.Module, loader, device, split: str, args, is_main: bool):
    """All features of a split, with a progress line every --print-freq batches (ImageNet takes minutes)."""
    progress = common.ProgressMeter(len(loader), [], prefix=f"Features ({split}): ") if is_main else None
    try:
        return common.extract_features(backbone, loader, device, concat_all_gather, progress, args.print_freq)
    except common.DataError as err:
        fail(common.data_error_message(err))


def sanity_check(backbone: nn.Module, reference: dict):
    """MoCo's main_lincls check: after training the probe the frozen backbone is bit-identical
    to the checkpoint (weights and BN statistics)."""
    for key, value in backbone.state_dict().items():
        if not torch.equal(value.cpu(), reference[key].cpu()):
            fail(f"sanity check failed: backbone tensor '{key}' changed during linear evaluation")


def train_transform(args, cmc_view: str):
    return transforms.Compose([transforms.RandomResizedCrop(args.image_size),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               common.ToColorSpace(cmc_view) if cmc_view else common.normalize])


def eval_transform(args, cmc_view: str):
    return common.eval_transform(args.image_size, common.ToColorSpace(cmc_view) if cmc_view else common.normalize)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, arXiv:1708.03888, Alg. 1) with momentum. Parameters in a group with
    `lars_exclude=True` (biases and BN, as in the official SimCLR and BYOL code) get plain SGD with
    momentum and no weight decay. The arithmetic runs as _foreach ops over all parameters at once."""

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
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def build_optimizer(classifier: nn.Linear, args) -> torch.optim.Optimizer:
    """MoCo protocol: SGD. SimSiam protocol: LARS on every parameter, the bias included: the official
    main_lincls.py wraps SGD in apex LARC (simsiam@a7bc177 l. 226–232), which adapts each parameter
    whose weight and gradient norms are non-zero (apex LARC.py@2ec84eb l. 86–102); the bias starts
    at 0, so its first step has trust 1 there as here. Weight decay 0 in both protocols."""
    if args.optimizer == "lars":
        return LARS(classifier.parameters(), args.init_lr, args.momentum, args.wd)
    return torch.optim.SGD(classifier.parameters(), args.init_lr, momentum=args.momentum, weight_decay=args.wd)


def adjust_learning_rate(optimizer, epoch: int, args):
    """Per epoch: cosine, or ×0.1 at each --schedule milestone."""
    if args.cos:
        lr = args.init_lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    else:
        lr = args.init_lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_one_epoch(loader, backbone, classifier, optimizer, epoch: int, args, device, is_main: bool, preempt=None) -> dict:
    batch_time, data_time = common.AverageMeter("Time", ":6.3f"), common.AverageMeter("Data", ":6.3f")
    losses = common.AverageMeter("Loss", ":.4e")
    top1, top5 = common.AverageMeter("Acc@1", ":6.2f"), common.AverageMeter("Acc@5", ":6.2f")
    progress = common.ProgressMeter(len(loader), [batch_time, data_time, losses, top1, top5],
                                    prefix=f"Epoch: [{epoch}/{args.epochs}]")
    backbone.eval()  # frozen, BN statistics fixed
    end = time.time()
    for i, (images, target) in preempt.steps(loader, epoch) if preempt else enumerate(loader):
        data_time.update(time.time() - end)
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.no_grad():
            feats = backbone(images)
        output = classifier(feats)
        loss = F.cross_entropy(output, target)
        acc1, acc5 = common.accuracy(output, target, topk=(1, 5))
        losses.update(loss, images.shape[0]), top1.update(acc1, images.shape[0]), top5.update(acc5, images.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == len(loader) - 1:
            check_finite(losses, epoch, i, args)
            if is_main:
                progress.display(i)
    return {"epoch": epoch, "loss": losses.avg, "train_acc1": top1.avg, "lr": optimizer.param_groups[0]["lr"]}


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

    if args.pretrained:  # METHOD
        backbone, reference = load_backbone(args.pretrained, args.arch, is_main, args.stem)
    else:
        args.arch = args.arch or "resnet50"
        stem = ("cifar" if args.image_size <= 32 else "imagenet") if args.stem == "auto" else args.stem
        if is_main:
            print(f"=> creating model '{args.arch}' ({stem} stem) with random weights (no --pretrained); "
                  f"BN statistics from the training images", flush=True)
        backbone = Backbone(args.arch, stem=stem)
        reference = None  # taken after the BN statistics are estimated, below
    args.arch, args.stem = backbone.arch, backbone.stem  # recorded in the probe's checkpoint
    args.backbone_sha1 = fingerprint(reference or backbone.state_dict())  # which weights the probe is of: a path can be overwritten
    if args.export:
        if backbone.cmc_view:
            fail("--export writes one torchvision ResNet; a CMC checkpoint holds two encoders")
        if args.export_format == "detectron2":
            return export_detectron2(backbone, args.export, is_main)
        if is_main:
            try:  # atomic, as save_checkpoint: a full disk leaves no partial file
                torch.save({k.removeprefix("encoder."): v for k, v in backbone.state_dict().items()}, args.export + ".tmp")
                os.replace(args.export + ".tmp", args.export)
            except (OSError, RuntimeError) as err:
                if os.path.exists(args.export + ".tmp"):
                    os.remove(args.export + ".tmp")
                fail(f"--export: cannot write '{args.export}': {first_line(err)}")
            load = "" if backbone.stem == "imagenet" else (
                " after setting conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = nn.Identity()")
            print(f"=> exported the backbone to '{args.export}': torchvision.models.{args.arch}() loads it "
                  f"with strict=False (only fc.* missing){load}; --pretrained reads it back", flush=True)
            if backbone.encoder.conv1.padding == (2, 2):
                print("   as solo-learn's CIFAR stem, with conv1 padding 2: nn.Conv2d(3, 64, 3, 1, 2, bias=False)", flush=True)
        return
    if not args.knn:  # the probe's checkpoint, read before any work; a finished probe ends here (exit status 0)
        prepare_output_dir(args.output_dir, is_main)
        if start_path:
            if is_main:
                print(f"=> loading checkpoint '{start_path}'", flush=True)
            resumed = load_checkpoint(start_path, "linear")
            check_same_backbone(start_path, resumed.get("args", {}), args)
            if resumed["epoch"] >= args.epochs:
                if is_main:
                    print(f"=> nothing to do: already at epoch {resumed['epoch']} of {args.epochs}; raise --epochs to "
                          f"train on (best Acc@1 {resumed.get('best_acc1', float('nan')):.2f})", flush=True)
                if ddp:
                    dist.destroy_process_group()
                return {key: resumed.get(key) for key in ("best_acc1", "best_epoch")}
    backbone.to(device).eval().requires_grad_(False)
    if args.compile:  # nn.Module.compile works in place: the sanity check and the probe's fingerprint see the same keys
        for net in backbone.modules():
            if isinstance(net, models.ResNet):
                net.compile()

    try:
        train_set = common.build_dataset(args.data, "train", train_transform(args, backbone.cmc_view), args.data_root)
        val_set = common.build_dataset(args.data, "val", eval_transform(args, backbone.cmc_view), args.data_root,
                                       return_index=True)
    except common.DataError as err:
        fail(str(err))
    if len(train_set) < args.batch_size:
        fail(f"'{args.data}' has {len(train_set)} training images, fewer than the global batch {args.batch_size}")
    num_classes = len(train_set.classes)
    per_process = args.batch_size // world_size
    if reference is None:
        plain = common.build_dataset(args.data, "train", eval_transform(args, backbone.cmc_view), args.data_root)
        estimate_bn_statistics(backbone, common.build_loader(plain, per_process, args.workers, rank, world_size,
                                                             train=False), device)
        reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    val_loader = common.build_loader(val_set, per_process, args.workers, rank, world_size, train=False)
    val_feats, val_labels = features(backbone, val_loader, device, "val", args, is_main)

    if args.knn:  # Wu et al. Sec. 3.4, on the training images without augmentation
        train_plain = common.build_dataset(args.data, "train", eval_transform(args, backbone.cmc_view),
                                           args.data_root, return_index=True)
        loader = common.build_loader(train_plain, per_process, args.workers, rank, world_size, train=False)
        train_feats, train_labels = features(backbone, loader, device, "train", args, is_main)
        scores = common.knn_classify(F.normalize(val_feats, dim=1), F.normalize(train_feats, dim=1),
                                     train_labels, num_classes, args.knn_k, args.knn_t)
        acc1, acc5 = common.accuracy(scores, val_labels, topk=(1, 5))
        if is_main:
            print(f"=> kNN (k={args.knn_k}, T={args.knn_t}): Acc@1 {float(acc1):.2f} Acc@5 {float(acc5):.2f}", flush=True)
        if ddp:
            dist.destroy_process_group()
        return {"knn_acc1": float(acc1), "knn_acc5": float(acc5)}

    classifier = nn.Linear(val_feats.shape[1], num_classes).to(device)
    nn.init.normal_(classifier.weight, std=0.01)  # MoCo main_lincls: N(0, 0.01), bias 0
    nn.init.zeros_(classifier.bias)
    args.init_lr = args.lr * args.batch_size / 256 if args.protocol == "simsiam" else args.lr
    optimizer = build_optimizer(classifier, args)
    best = {"best_acc1": float("-inf"), "best_epoch": -1}  # official main_lincls.py: best top-1, in the checkpoint too

    def checkpoint(epoch: int, step: int = 0) -> dict:  # SCAFFOLD: the run after `step` steps of `epoch`
        return {"method": "linear", "arch": args.arch, "epoch": epoch, "step": step, "args": vars(args),
                "state_dict": {"module." + k: v for k, v in unwrap(classifier).state_dict().items()},
                "optimizer": optimizer.state_dict(), **best}

    preempt = Preemption(args, checkpoint, is_main, device)  # SCAFFOLD: a stop signal now ends the run at a step
    if start_path:
        restore_checkpoint(resumed, start_path, classifier, optimizer)
        args.start_epoch = preempt.resume(resumed)
        best = {key: resumed.get(key, value) for key, value in best.items()}
        if is_main:
            print(f"=> loaded checkpoint '{start_path}' (epoch {args.start_epoch})", flush=True)
    if ddp:
        classifier = nn.parallel.DistributedDataParallel(classifier, device_ids=[local_rank] if device.type == "cuda" else None)
    train_loader = common.build_loader(train_set, per_process, args.workers, rank, world_size,
                                       train=True, seed=args.seed)

    metrics = dict(best)
    try:  # SCAFFOLD: a run that fails (a NaN loss, a bad image) still gives the signals back
        for epoch in range(args.start_epoch, args.epochs):
            train_loader.sampler.set_epoch(epoch)
            seed_everything(args.seed, 1000 * (epoch + 1) + rank)
            adjust_learning_rate(optimizer, epoch, args)
            try:
                metrics = train_one_epoch(train_loader, backbone, classifier, optimizer, epoch, args, device, is_main, preempt)
            except common.DataError as err:
                fail(common.data_error_message(err))
            with torch.no_grad():  # the backbone is frozen, so the validation features were computed once
                acc1, acc5 = common.accuracy(classifier(val_feats), val_labels, topk=(1, 5))
            metrics.update(acc1=float(acc1), acc5=float(acc5))
            if metrics["acc1"] > best["best_acc1"]:
                best = {"best_acc1": metrics["acc1"], "best_epoch": epoch}
            metrics.update(best)
            if is_main:
                print(f" * Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} (epoch {epoch})", flush=True)
                save_checkpoint(checkpoint(epoch + 1), args.output_dir)
                with open(os.path.join(args.output_dir, "log.txt"), "a") as f:  # after the save: log and checkpoint agree
                    f.write(json.dumps(metrics) + "\n")
            preempt.epoch_done(epoch + 1)
    finally:
        preempt.close()
    sanity_check(backbone, reference)
    if is_main:  # `=> linear probe: Acc@1 <last>` is parsed by other code: keep its start
        print(f"=> linear probe: Acc@1 {metrics.get('acc1', float('nan')):.2f} "
              f"Acc@5 {metrics.get('acc5', float('nan')):.2f} (last epoch); best Acc@1 {best['best_acc1']:.2f} "
              f"(epoch {best['best_epoch']}) (backbone unchanged: sanity check passed); "
              f"checkpoint '{os.path.join(args.output_dir, 'checkpoint.pth.tar')}'", flush=True)
    if ddp:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback: saves are atomic, so every checkpoint on disk is whole
        print(f"{PROG}: interrupted; the checkpoints saved so far are intact", file=sys.stderr)
        raise SystemExit(130)  # 128 + SIGINT, as a shell reports it
