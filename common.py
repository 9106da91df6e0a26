"""Meters and data helpers shared by every script. Nothing here knows about DDP or a method.

Meters: `AverageMeter`, `ProgressMeter` (the official MoCo progress line, with the time left), `accuracy`, and the
weighted kNN classifier shared by `linear_eval.py --knn` and the online kNN monitor of every training script.
Data: `build_dataset` (`--data`), `build_loader` (`ResumableSampler`, per-sample seeded views), the evaluation view,
the multi-view transform, the blur of MoCo v2, CMC's colour spaces, and the built-in `synthetic` and `shapes` sets.
"""
import datetime
import itertools
import os
import random

import torch
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import Image, ImageFilter

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------------------- meters
class AverageMeter:
    """Running average; tensors stay on their device until printed, so an update costs no host sync."""

    def __init__(self, name: str, fmt: str = ":f"):
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self):
        self.val, self.sum, self.count = 0.0, 0.0, 0

    def update(self, val, n: int = 1):
        val = val.detach() if torch.is_tensor(val) else val
        self.val = val
        self.sum = self.sum + val * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(self.sum) / max(self.count, 1)

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(
            name=self.name, val=float(self.val), avg=self.avg)


class ProgressMeter:
    """The official progress line. With `steps_after` (the run's steps after this epoch), its first meter being the
    step time, it ends with the time left in the epoch and in the run."""

    def __init__(self, num_batches: int, meters, prefix: str = "", steps_after=None):
        digits = len(str(num_batches))
        self.batch_fmt = "[{:" + str(digits) + "d}/" + str(num_batches) + "]"
        self.num_batches, self.meters, self.prefix, self.steps_after = num_batches, meters, prefix, steps_after

    def display(self, batch: int):
        entries = [self.prefix + self.batch_fmt.format(batch)] + [str(m) for m in self.meters]
        if self.steps_after is not None:
            left = [(self.num_batches - batch - 1 + more) * self.meters[0].avg for more in (0, self.steps_after)]
            entries.append("ETA {} (run {})".format(*(datetime.timedelta(seconds=round(s)) for s in left)))
        print("\t".join(entries), flush=True)


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)):
    """Top-k accuracy in percent, as 1-element tensors (no host sync)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, 1, True, True).indices.t()  # maxk×N
    correct = pred.eq(target.view(1, -1))
    return [correct[:min(k, maxk)].any(0).float().mean() * 100 for k in topk]


@torch.no_grad()
def extract_features(embed, loader, device, gather=lambda t: t, progress=None, print_freq: int = 10):
    """Features (n×d) and labels of a whole `return_index` dataset, in its order: each process embeds its shard and
    `gather` (an all-gather; the identity for one process) brings every (index, feature, label) to all of them."""
    n = len(loader.dataset)
    feats, labels = None, torch.zeros(n, dtype=torch.long, device=device)
    for i, (images, target, index) in enumerate(loader):
        f = embed(images.to(device, non_blocking=True))
        if feats is None:
            feats = torch.zeros(n, f.shape[1], device=device)
        index = gather(index.to(device))
        feats[index] = gather(f.float())
        labels[index] = gather(target.to(device))
        if progress is not None and (i % print_freq == 0 or i == len(loader) - 1):
            progress.display(i)
    return feats, labels


@torch.no_grad()
def knn_classify(feats: torch.Tensor, train_feats: torch.Tensor, train_labels: torch.Tensor,
                 num_classes: int, k: int = 200, T: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018, Sec. 3.4): the k most cosine-similar training features (inputs L2-normalised) vote
    for their class with weight exp(s_i/T). Returns class scores, n×num_classes."""
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, feats.shape[0], chunk):  # chunks of queries bound the n×N similarity matrix
        sim, idx = (feats[start:start + chunk] @ train_feats.t()).topk(k, dim=1)  # chunk×k
        votes = torch.zeros(sim.shape[0], num_classes, device=feats.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / T).exp()))
    return torch.cat(scores)


@torch.no_grad()
def knn_monitor(model: torch.nn.Module, features, loaders, device, gather, args, epoch: int, log=print) -> dict:
    """The training scripts' online monitor, every --knn-every epochs and after the last: the kNN top-1 of `features`
    (the backbone), the model in eval mode (BN statistics fixed), then back in train mode; it draws no random number."""
    if not loaders or ((epoch + 1) % args.knn_every and epoch + 1 < args.epochs):
        return {}
    model.eval()
    acc1, _ = knn_accuracy(features, *loaders, device, gather)  # k = 200, T = 0.07
    model.train()
    log(f" * kNN Acc@1 {float(acc1):.2f} (epoch {epoch}, backbone, k=200, T=0.07)")
    return {"knn_acc1": float(acc1)}


def knn_accuracy(embed, train_loader, val_loader, device, gather=lambda t: t, k: int = 200,
                 T: float = 0.07, num_classes: int = 0):
    """Top-1/top-5 (percent, device tensors) of the weighted kNN: val features against train features
    (both L2-normalised), as `linear_eval.py --knn` and the online monitor report it."""
    train_feats, train_labels = extract_features(embed, train_loader, device, gather)
    val_feats, val_labels = extract_features(embed, val_loader, device, gather)
    scores = knn_classify(torch.nn.functional.normalize(val_feats, dim=1),
                          torch.nn.functional.normalize(train_feats, dim=1), train_labels,
                          num_classes or int(train_labels.max()) + 1, k, T)
    return accuracy(scores, val_labels, topk=(1, 5))


# ------------------------------------------------------------------------------ augmentation ops
def eval_transform(image_size: int, last=normalize) -> transforms.Compose:
    """The evaluation view: resize the short side to size/0.875, centre crop (MoCo main_lincls)."""
    return transforms.Compose([transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), last])


class MultiView:
    """n augmented views of one image: `MultiView([t, t])` (MoCo, SimCLR) or `MultiView([t1, t2])`
    (BYOL's asymmetric pair)."""

    def __init__(self, views):
        self.views = list(views)

    def __call__(self, x):
        return [t(x) for t in self.views]


class GaussianBlur:
    """PIL Gaussian blur, σ uniform in `sigma` (MoCo v2, SimSiam: [0.1, 2] at 224 px) and scaled with the image's
    width, as SimCLR App. A scales its kernel: a 32 px image is blurred as much, relatively; at 224 px, the papers'."""

    def __init__(self, sigma=(0.1, 2.0), reference_size: int = 224):
        self.sigma, self.reference_size = sigma, reference_size

    def __call__(self, img):
        sigma = random.uniform(*self.sigma) * img.width / self.reference_size
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], shape 3×H×W (or B×3×H×W) → CIE L*a*b* (D65): L in [0, 100], a, b in ≈[−110, 110]."""
    c = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)  # linearise sRGB
    m = torch.tensor([[0.412453, 0.357580, 0.180423],
                      [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, c)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp(min=1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    L = 116 * fy - 16
    return torch.stack([L, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → YCbCr, ITU-R BT.601 studio range (Y in [16, 235], Cb and Cr in [16, 240]):
    skimage.color.rgb2ycbcr, which the official CMC code uses (dataset.py, RGB2YCbCr)."""
    r, g, b = rgb.unbind(-3)
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    return torch.stack([y, cb, cr], dim=-3)


class ToColorSpace:
    """CMC (Sec. 4.1): tensor RGB in [0, 1] → normalised Lab or YCbCr, channels [L|ab] or [Y|CbCr]."""

    # The official train_CMC.py's (HobbitLong/CMC@7b227be l. 132–137). Lab: L from [0, 100], a and b from their sRGB
    # ranges [−86.183, 98.233], [−107.857, 94.478], onto [−1, 1]. YCbCr: about ImageNet's mean (studio range).
    STATS = {"Lab": ((50.0, 6.025, -6.6895), (50.0, 92.208, 101.1675)),
             "YCbCr": ((116.151, 121.080, 132.342), (109.500, 111.855, 111.964))}

    def __init__(self, view: str = "Lab"):
        self.view = view
        self.convert = rgb_to_lab if view == "Lab" else rgb_to_ycbcr
        mean, std = self.STATS[view]
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        return (self.convert(rgb) - self.mean.to(rgb)) / self.std.to(rgb)


# ---------------------------------------------------------------------------------------- datasets
class DataError(Exception):
    """A data problem the user must fix (a missing folder, an unreadable image). Its text is one line, also when a
    DataLoader worker re-raised it with the worker's traceback: the scripts exit with it."""

    def __str__(self):
        return super().__str__().strip().splitlines()[-1].split("DataError: ")[-1]


def load_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # any PIL or OS failure is the same problem for the user
        raise DataError(f"cannot read image '{path}': {err}") from None


class SyntheticTextures(torch.utils.data.Dataset):
    """`--data synthetic`: 10 texture classes, generated from a seed, no files (docs/synthetic.md: the design and what
    was measured before it). A class is a texture that fills the whole image, so it survives every crop and any two
    crops of one image share it; the only nuisances drawn per image are ones the papers' augmentations randomise
    (period: scale crops; phase: crop position, every class being flip-symmetric; grey levels and contrast within the
    jitter's range; pixel noise), so instance discrimination has no class-free shortcut. Light parts are warm and dark
    parts cool in every image, so CMC's ab view shows the texture too. `synthetic:N`: N train and N/5 val images."""

    classes = ["horizontal stripes", "vertical stripes", "checkerboard", "diamond checkerboard", "dots",
               "grid lines", "concentric rings", "plaid", "zig-zag stripes", "smooth blobs"]
    num_classes = len(classes)

    def __init__(self, size: int = 5000, split: str = "train", image_size: int = 32, transform=None, seed: int = 0):
        self.transform = transform
        g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
        self.targets = torch.arange(size) % self.num_classes  # balanced classes
        self.targets = self.targets[torch.randperm(size, generator=g)]
        images = [self._render(self.targets[i:i + 500], image_size, g) for i in range(0, size, 500)]
        self.images = torch.cat(images)  # N×H×W×3 uint8, rendered once (~3 kB an image at 32 px)

    @staticmethod
    def _render(labels: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
        n = len(labels)

        def rand(*shape):
            return torch.rand(*shape, generator=g)

        coords = torch.arange(s, dtype=torch.float32)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # H×W
        u, v = xx.expand(n, s, s), yy.expand(n, s, s)  # n×H×W; no rotation: no augmentation undoes it
        period = (4 + 4 * rand(n)).view(n, 1, 1) * (s / 32)
        pu, pv = rand(n, 1, 1) * period, rand(n, 1, 1) * period  # random phase

        def wave(t):  # square wave in {0, 1} with the image's period
            return ((t / period).frac() < 0.5).float()

        def tri(t):  # triangle wave in [0, 1]
            return 1 - 2 * ((t / period).frac() - 0.5).abs()

        U, V = u + pu, v + pv
        cy, cx = s * rand(n, 1, 1), s * rand(n, 1, 1)
        r = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        near = lambda t, w: ((t / period).frac() < w).float()  # noqa: E731
        blobs = torch.nn.functional.interpolate(torch.randn(n, 1, 5, 5, generator=g), size=(s, s),
                                                mode="bicubic", align_corners=False)[:, 0]
        patterns = torch.stack([
            wave(V),                                            # 0 horizontal stripes
            wave(U),                                            # 1 vertical stripes
            (wave(U) != wave(V)).float(),                       # 2 checkerboard
            (wave((U + V) / 1.4142) != wave((U - V) / 1.4142)).float(),  # 3 diamond checkerboard
            ((tri(U) * tri(V)) > 0.55).float(),                 # 4 dots
            torch.maximum(near(U, 0.25), near(V, 0.25)),        # 5 grid lines
            wave(r + pu),                                       # 6 concentric rings
            torch.maximum(wave(U * 0.5), near(V, 0.2)),         # 7 plaid
            wave(V + period * 0.5 * tri(U * 0.7)),              # 8 zig-zag stripes
            (blobs > 0).float(),                                # 9 smooth blobs
        ], 1)  # n×10×H×W
        p = patterns[torch.arange(n), labels].unsqueeze(-1)  # n×H×W×1 in {0, 1}
        dark = 0.3 + 0.1 * rand(n, 1, 1, 1)  # grey levels vary less than brightness/contrast jitter does
        light = dark + 0.35 + 0.1 * rand(n, 1, 1, 1)
        swap = rand(n, 1, 1, 1) < 0.5  # pattern light on dark or dark on light
        c1, c2 = torch.where(swap, light, dark), torch.where(swap, dark, light)
        grey = c1 + (c2 - c1) * p  # n×H×W×1
        warm = torch.tensor([1.0, 0.0, -1.0])  # light parts warm, dark parts cool: the pattern is in a/b too
        img = grey + 0.3 * (grey - grey.mean((1, 2), keepdim=True)) * warm
        img = img + 0.04 * torch.randn(n, s, s, 3, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].numpy())
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


class SyntheticShapes(SyntheticTextures):
    """`--data shapes`: 8 shape classes, to check on other data a recipe tuned on `synthetic` (docs/synthetic.md). One
    shape an image, 19-29 px across at 32 px, upright (no augmentation rotates), at a random size and offset, in a
    random colour: light on a darkened or dark on a lightened vertical gradient between two random colours, partly
    behind a grey rectangle (an occluder). Colour names no class, but marks the image: colour jitter re-draws its hue
    only in part (docs/results.md). `shapes:N`: N train and N/5 val images."""

    classes = ["disc", "square", "triangle", "plus", "ring", "bar", "half disc", "frame"]
    num_classes = len(classes)

    @staticmethod
    def _render(labels: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
        n = len(labels)

        def rand(*shape):
            return torch.rand(*shape, generator=g)

        yy, xx = torch.meshgrid(*[(torch.arange(s, dtype=torch.float32) + 0.5) / s] * 2, indexing="ij")  # H×W
        light = rand(n, 1, 1, 1) < 0.5  # a light shape on a darkened background, or a dark one on a lightened
        top, bottom = rand(n, 1, 1, 3), rand(n, 1, 1, 3)  # two colours of any hue
        img = 0.5 * (top + (bottom - top) * yy.unsqueeze(-1)) + torch.where(light, 0.0, 0.5)  # n×H×W×3
        r = 0.3 + 0.15 * rand(n, 1, 1)  # radius, as a fraction of the image
        u = (xx - 0.5 - 0.3 * (rand(n, 1, 1) - 0.5)) / r  # the shape's frame: centre 0, radius 1
        v = (yy - 0.5 - 0.3 * (rand(n, 1, 1) - 0.5)) / r
        d, m = (u ** 2 + v ** 2).sqrt(), torch.maximum(u.abs(), v.abs())
        masks = torch.stack([d < 1, m < 0.8, (v > -0.5) & (1.732 * u.abs() + v < 1),
                             ((u.abs() < 0.3) | (v.abs() < 0.3)) & (m < 1), (d > 0.55) & (d < 1),
                             (u.abs() < 1) & (v.abs() < 0.3), (d < 1) & (v > 0), (m > 0.5) & (m < 0.9)], 1)
        colour = 0.4 * rand(n, 1, 1, 3) + torch.where(light, 0.6, 0.0)
        img = torch.where(masks[torch.arange(n), labels].unsqueeze(-1), colour, img)
        cx, cy, w, h = rand(n, 1, 1), rand(n, 1, 1), 0.05 + 0.1 * rand(n, 1, 1), 0.05 + 0.1 * rand(n, 1, 1)
        img = torch.where((((xx - cx).abs() < w) & ((yy - cy).abs() < h)).unsqueeze(-1), 0.45 + 0.1 * rand(n, 1, 1, 1),
                          img)
        img = img + 0.03 * torch.randn(n, s, s, 3, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)


class WithIndex(torch.utils.data.Dataset):
    """(image, target, index): memory banks (InsDis, CMC) and kNN need the sample's index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return img, target, index


def default_image_size(data: str) -> int:
    return {"synthetic": 32, "shapes": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}.get(data.split(":")[0], 224)


def labelled(data: str) -> bool:
    """The built-in data sets, whose labels the kNN monitor uses by default (an image folder's may be placeholders)."""
    return data.split(":")[0] in ("synthetic", "shapes", "cifar10", "cifar100", "stl10")


def build_dataset(data: str, split: str, transform, data_root: str = "./data",
                  return_index: bool = False):
    """`--data` → dataset. split: "pretrain" (STL-10 adds its unlabelled images), "train" or "val".

    An image folder is `ROOT/train/CLASS/*` + `ROOT/val/CLASS/*`, or `ROOT/CLASS/*` (train only)."""
    name, _, arg = data.partition(":")
    if name in ("synthetic", "shapes"):
        cls, size = SyntheticTextures if name == "synthetic" else SyntheticShapes, int(arg) if arg else 5000
        dataset = cls(size if split != "val" else max(size // 5, cls.num_classes), split, transform=transform)
    elif name in ("cifar10", "cifar100", "stl10"):
        created = not os.path.exists(data_root)
        try:
            if name == "stl10":
                stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
                dataset = datasets.STL10(data_root, split=stl_split, transform=transform, download=True)
            else:
                cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
                dataset = cls(data_root, train=split != "val", transform=transform, download=True)
        except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a corrupt download
            if created and os.path.isdir(data_root) and not os.listdir(data_root):
                os.rmdir(data_root)  # torchvision made it: leave no empty folder behind
            raise DataError(f"--data {name}: cannot download it into --data-root '{data_root}' "
                            f"({getattr(err, 'reason', err)}); offline, copy torchvision's files there") from None
    else:
        if not os.path.isdir(data):
            raise DataError(f"data folder '{data}' does not exist")
        has_splits = os.path.isdir(os.path.join(data, "train"))
        if split == "val" and not os.path.isdir(os.path.join(data, "val")):
            raise DataError(f"data folder '{data}' has no val/ folder for evaluation")
        root = os.path.join(data, "val" if split == "val" else "train") if has_splits else data
        try:
            dataset = datasets.ImageFolder(root, transform=transform, loader=load_image)
        except (FileNotFoundError, RuntimeError) as err:  # no class folder / no image in them
            raise DataError(f"data folder '{root}' holds no images: {err}") from None
    return WithIndex(dataset) if return_index else dataset


class SeededViews(torch.utils.data.Dataset):
    """A training sample's views are a function of (seed, epoch, index), torch's and Python's generators seeded around
    each `dataset[index]` and restored: they do not depend on the worker or on where a run was resumed."""

    def __init__(self, dataset, sampler, seed: int):
        self.dataset, self.sampler, self.seed = dataset, sampler, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = hash((self.seed, self.sampler.epoch, index)) % 2 ** 32  # torch's mt19937 reads 32 bits
        with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA's is never touched
            torch.default_generator.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler that skips the first `start` of this rank's indices of the epoch (a run resumed mid-epoch).
    len() stays the whole epoch's, so step counts and per-step schedules count from the epoch's start."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


def build_loader(dataset, batch_size: int, workers: int, rank: int, world_size: int, train: bool = True, seed=None):
    """DataLoader over this process's shard (`batch_size` per process; one process is world size 1). A training loader's
    views are seeded per sample from `seed` (--seed, else a random one), its order from `seed or 0`; an evaluation
    loader (train=False) draws nothing from the training process's generator."""
    if train and len(dataset) < batch_size * world_size:
        raise DataError(f"the data has {len(dataset)} images, fewer than the global batch {batch_size * world_size}")
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed or 0,
                               drop_last=train)
    if train:
        dataset = SeededViews(dataset, sampler, torch.initial_seed() if seed is None else seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       drop_last=train, persistent_workers=False,
                                       generator=None if train else torch.Generator())


def knn_loaders(args, rank: int, world_size: int, last=normalize) -> list:
    """The kNN monitor's data: the train and val splits of --data in the evaluation view, with their indices."""
    return [build_loader(build_dataset(args.data, split, eval_transform(args.image_size, last), args.data_root, True),
                         args.batch_size // world_size, args.workers, rank, world_size, train=False)
            for split in ("train", "val")]
