"""--decode tensor: torchvision.io decode and transforms.v2 ops on uint8 tensors, for image folders. Each
method's PIL pipeline is rewritten op for op (common.tensor_transform); these tests check that every op keeps
its parameters and draws them from the same distribution as the PIL op (ranges and frequencies, not pixels),
that the decoders agree, and that the flag runs end to end and is refused where there is no file to decode.
PIL stays the default: benchmarks/data.py measured the tensor path at 0.77-1.11× its speed (docs/gpu.md)."""
import math
import random

import pytest
import torch
import torchvision.transforms as transforms
import torchvision.transforms.v2 as v2
from PIL import Image, ImageFilter

import byol
import cmc
import common
import insdis
import linear_eval
import moco
import simclr
import simsiam
from conftest import last_line

PIPELINES = {  # every augmentation a script builds, at the paper's 224 px
    "moco": lambda: moco.build_transform(moco.parse_args(["--data", "x"])),
    "moco v2": lambda: moco.build_transform(moco.parse_args(["--data", "x", "--aug-plus"])),
    "simclr": lambda: simclr.build_transform(simclr.parse_args(["--data", "x"])),
    "byol": lambda: byol.build_transform(byol.parse_args(["--data", "x"])),
    "simsiam": lambda: simsiam.build_transform(simsiam.parse_args(["--data", "x"])),
    "insdis": lambda: insdis.build_transform(insdis.parse_args(["--data", "x"])),
    "cmc": lambda: cmc.build_transform(cmc.parse_args(["--data", "x"])),
    "linear_eval train": lambda: linear_eval.train_transform(linear_eval.parse_args(["--data", "x"]), ""),
    "linear_eval eval": lambda: linear_eval.eval_transform(linear_eval.parse_args(["--data", "x"]), "Lab"),
}
# the PIL op's parameters, as attributes of the op both versions store them in
PARAMETERS = {transforms.RandomResizedCrop: ("size", "scale", "ratio", "interpolation"), transforms.Resize: ("size", "interpolation", "max_size"),
              transforms.CenterCrop: ("size",), transforms.RandomHorizontalFlip: ("p",), transforms.RandomApply: ("p",),
              transforms.ColorJitter: ("brightness", "contrast", "saturation", "hue"), transforms.RandomGrayscale: ("p",),
              transforms.GaussianBlur: ("kernel_size", "sigma"), transforms.RandomSolarize: ("threshold", "p")}
DRAWS = 4000  # per distribution: a mean's standard error is ~0.3 % of its range


def flat(t) -> list:
    """The ops of a pipeline in order, views and RandomApply opened."""
    if isinstance(t, common.MultiView):
        return [op for view in t.views for op in flat(view)]
    if isinstance(t, (transforms.Compose, v2.Compose)):
        return [op for sub in t.transforms for op in flat(sub)]
    if isinstance(t, (transforms.RandomApply, v2.RandomApply)):
        return [t] + [op for sub in t.transforms for op in flat(sub)]
    return [t]


@pytest.mark.parametrize("name", PIPELINES)
def test_every_op_becomes_its_v2_op_with_the_same_parameters(name):
    pil = PIPELINES[name]()
    ops = list(zip(flat(pil), flat(common.tensor_transform(pil)), strict=True))
    for old, new in ops:
        if isinstance(old, (transforms.Normalize, common.GaussianBlur, common.ToColorSpace)):
            assert new is old  # tensor ops already, or both kinds of input
        elif isinstance(old, transforms.ToTensor):
            assert isinstance(new, v2.ToDtype) and new.dtype == torch.float32 and new.scale  # uint8 / 255, as ToTensor
        else:
            assert type(new) is getattr(v2, type(old).__name__), type(old)
            for attribute in PARAMETERS[type(old)]:
                expected = getattr(old, attribute)
                found = getattr(new, attribute)
                if attribute in ("size", "kernel_size", "sigma", "scale", "ratio") and expected is not None:
                    expected, found = list(expected) if not isinstance(expected, int) else [expected], \
                        list(found) if not isinstance(found, int) else [found]
                assert found == expected or (expected is None and found is None), (type(old), attribute)
            if hasattr(new, "antialias"):
                assert new.antialias  # PIL always antialiases when it shrinks


def test_an_op_without_a_tensor_version_is_an_error_not_dropped():
    with pytest.raises(TypeError, match="no tensor version of RandomRotation"):
        common.tensor_transform(transforms.Compose([transforms.RandomRotation(10)]))


def test_crop_boxes_are_drawn_from_the_same_distribution():
    """RandomResizedCrop: area fraction and aspect ratio of the box, PIL op against v2 op, on a 500×375 image."""
    torch.manual_seed(0)
    image, tensor = Image.new("RGB", (500, 375)), torch.zeros(3, 375, 500, dtype=torch.uint8)
    old = transforms.RandomResizedCrop(224, scale=(0.08, 1.0))
    new = common.tensor_transform(old)
    boxes = {"pil": [old.get_params(image, old.scale, old.ratio)[2:] for _ in range(DRAWS)],
             "tensor": [(p["height"], p["width"]) for p in (new.make_params([tensor]) for _ in range(DRAWS))]}
    stats = {}
    for path, hw in boxes.items():
        area = torch.tensor([h * w / (500 * 375) for h, w in hw])
        aspect = torch.tensor([w / h for h, w in hw]).log()
        assert area.min() >= 0.08 - 0.01 and area.max() <= 1 and aspect.abs().max() <= 0.2877 + 0.01  # log(4/3)
        stats[path] = (area.mean(), area.std(), aspect.mean(), aspect.std())
    for pil, tensor in zip(stats["pil"], stats["tensor"]):
        assert tensor == pytest.approx(pil, abs=0.02)


def test_colour_jitter_factors_and_order_are_drawn_from_the_same_distribution():
    torch.manual_seed(0)
    old = transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)  # SimCLR's strength 1: the widest ranges
    new = common.tensor_transform(old)
    drawn = {"pil": [old.get_params(old.brightness, old.contrast, old.saturation, old.hue) for _ in range(DRAWS)],
             "tensor": [tuple(p[k] for k in ("fn_idx", "brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"))
                        for p in (new.make_params([torch.zeros(3, 2, 2, dtype=torch.uint8)]) for _ in range(DRAWS))]}
    for i, (low, high) in enumerate([old.brightness, old.contrast, old.saturation, old.hue], start=1):
        values = {path: torch.tensor([float(d[i]) for d in draws]) for path, draws in drawn.items()}
        for path, v in values.items():
            assert low <= v.min() and v.max() <= high, path  # uniform on the same range
        assert values["tensor"].mean() == pytest.approx(values["pil"].mean(), abs=0.02 * (high - low))
        assert values["tensor"].std() == pytest.approx(values["pil"].std(), abs=0.02 * (high - low))
    first = {path: torch.bincount(torch.tensor([int(d[0][0]) for d in draws]), minlength=4) / DRAWS
             for path, draws in drawn.items()}
    assert torch.allclose(first["pil"], torch.full((4,), 0.25), atol=0.03)  # a random order of the four
    assert torch.allclose(first["tensor"], torch.full((4,), 0.25), atol=0.03)


@pytest.mark.parametrize("p", [0.2, 0.8])
def test_probabilities_mean_the_same_thing(p):
    """p is the chance that the op is applied in both versions (RandomApply, RandomGrayscale, flip, solarise)."""
    torch.manual_seed(0)
    pixels = torch.tensor([[[250, 10], [10, 250]], [[10, 250], [250, 10]], [[10, 10], [250, 250]]], dtype=torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    for old in (transforms.RandomApply([transforms.RandomSolarize(128, p=1.0)], p=p), transforms.RandomGrayscale(p),
                transforms.RandomHorizontalFlip(p), transforms.RandomSolarize(128, p)):
        new = common.tensor_transform(old)
        changed_pil = sum(old(image).tobytes() != image.tobytes() for _ in range(1000)) / 1000
        changed_tensor = sum(not torch.equal(new(pixels), pixels) for _ in range(1000)) / 1000
        assert changed_pil == pytest.approx(p, abs=0.05) and changed_tensor == pytest.approx(p, abs=0.05), old


def test_blur_draws_the_same_sigma_and_cuts_the_gaussian_at_3_sigma(monkeypatch):
    blur, calls = common.GaussianBlur((0.1, 2.0)), []
    monkeypatch.setattr(ImageFilter, "GaussianBlur", lambda radius: calls.append(("pil", radius)) or ImageFilter.BLUR)
    monkeypatch.setattr(v2.functional, "gaussian_blur", lambda img, kernel, sigma: calls.append(("tensor", sigma[0], kernel)) or img)
    for seed in range(20):
        random.seed(seed)
        blur(Image.new("RGB", (448, 336)))
        random.seed(seed)
        blur(torch.zeros(3, 336, 448, dtype=torch.uint8))
    for (_, radius), (_, sigma, kernel) in zip(calls[::2], calls[1::2]):
        assert sigma == radius and 0.2 <= sigma <= 4.0  # σ ∈ [0.1, 2] at 224 px, scaled with the width
        assert kernel == [2 * math.ceil(3 * sigma) + 1] * 2


def test_the_decoders_agree_to_a_few_levels(tmp_path):
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 5), size=(75, 100), mode="bicubic")[0].clamp(0, 1)
    rgb = Image.fromarray((smooth * 255).round().byte().permute(1, 2, 0).numpy())
    for name, image in (("rgb.jpg", rgb), ("grey.jpg", rgb.convert("L")), ("rgb.png", rgb)):
        image.save(tmp_path / name, quality=90)
        pil = transforms.functional.pil_to_tensor(common.load_image(str(tmp_path / name)))
        tensor = common.read_image_tensor(str(tmp_path / name))
        assert tensor.dtype == torch.uint8 and tensor.shape == pil.shape == (3, 75, 100), name  # grey -> RGB too
        assert (tensor.int() - pil.int()).abs().float().mean() < 1.0, name
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(common.DataError, match=f"cannot read image '{tmp_path / 'bad.jpg'}'"):
        common.read_image_tensor(str(tmp_path / "bad.jpg"))


def test_a_run_with_decode_tensor_trains_on_a_folder_and_synthetic_data_refuses_it(tmp_path, capsys):
    torch.manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(48, 64, 3) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / c / f"{i}.jpg", quality=90)
    argv = ["-a", "resnet18", "-b", "4", "--image-size", "32", "--moco-k", "8", "-j", "0", "--epochs", "1",
            "--aug-plus", "--decode", "tensor"]
    moco.main(["--data", str(tmp_path / "data"), *argv, "--output-dir", str(tmp_path / "out")])  # in this process:
    stdout = capsys.readouterr().out  # no interpreter start-up in the fast tier; a failure raises SystemExit here
    assert torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=True)["args"]["decode"] == "tensor"
    with pytest.raises(SystemExit) as err:
        moco.main(["--data", "synthetic:16", *argv, "--output-dir", str(tmp_path / "synthetic")])
    assert str(err.value) == "moco.py: --decode tensor is for image folders; --data synthetic is decoded in memory with PIL"
    assert last_line(stdout).startswith("=> done: epoch 1 of 1")
