"""linear_eval.py as a bridge between libraries: reading solo-learn and lightly checkpoints, and the
detectron2 export (the renaming of facebookresearch/moco detection/convert-pretrain-to-detectron2.py).
Each foreign layout is rebuilt here as its library lays it out, with random weights and BN statistics."""
import argparse
import copy
import functools
import pickle

import pytest
import torch
import torch.nn as nn
import torchvision.models as models

import linear_eval
from conftest import run_script


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms too, so that a tensor loaded into the wrong place shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1), m.num_batches_tracked.fill_(7)
    return net.eval()


def solo_learn_resnet18(stem: str) -> nn.Module:
    """solo-learn's backbone (solo/methods/base.py@9f60a1b l. 193-203): torchvision's ResNet, fc removed,
    on CIFAR a 3×3 stride-1 conv1 padded by 2 and no max-pool."""
    net = models.resnet18()
    net.fc = nn.Identity()
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        net.maxpool = nn.Identity()
    return randomised(net)


def lightning(state_dict: dict, hyper_parameters: dict) -> dict:
    """The top level of a Lightning 2.x checkpoint: tensors, numbers, strings, None, nested dicts/lists."""
    return {"epoch": 399, "global_step": 78000, "pytorch-lightning_version": "2.0.9", "state_dict": state_dict,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 78000},
                                   "epoch_progress": {"total": {"ready": 400, "completed": 399}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {
                "monitor": None, "best_model_score": None, "kth_value": torch.tensor(float("inf")),
                "dirpath": "/runs/ckpt", "best_k_models": {}, "last_model_path": ""}},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                  "param_groups": [{"lr": 0.3, "momentum": 0.9, "betas": (0.9, 0.999),
                                                    "nesterov": False, "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [0.3], "last_epoch": 399, "_last_lr": [0.0]}],
            "hparams_name": "kwargs", "hyper_parameters": hyper_parameters}


def prefixed(prefix: str, module: nn.Module) -> dict:
    return {prefix + k: v for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=None)  # built once per stem; the tests only read them
def foreign_checkpoints(stem: str = "imagenet"):
    """(checkpoint, source backbone, layout name in the load line, prefix(es) in it, keys ignored)."""
    torch.manual_seed(1)
    backbone = solo_learn_resnet18(stem)
    projector = nn.Sequential(nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 256))
    # solo-learn BYOL: backbone, projector, predictor, online classifier, momentum copies
    solo = {**prefixed("backbone.", backbone), **prefixed("projector.", projector),
            **prefixed("predictor.", projector), "classifier.weight": torch.randn(10, 512),
            "classifier.bias": torch.randn(10), **prefixed("momentum_backbone.", backbone),
            **prefixed("momentum_projector.", projector)}
    # solo-learn before Dec 2021: the same module called `encoder`
    solo_old = {k.replace("backbone", "encoder"): v for k, v in solo.items()}
    # lightly benchmarks/imagenet/resnet50/mocov2.py@4dede59 l. 30-37 (a ResNet-18 here, for speed)
    lightly_bench = {**prefixed("backbone.", backbone), **prefixed("projection_head.layers.", projector),
                     **prefixed("key_backbone.", backbone), **prefixed("key_projection_head.layers.", projector),
                     "online_classifier.classification_head.weight": torch.randn(1000, 512),
                     "online_classifier.classification_head.bias": torch.randn(1000)}
    sequential = nn.Sequential(*list(copy.deepcopy(backbone).children())[:-1])  # lightly examples/pytorch/moco.py
    lightly_example = {**prefixed("backbone.", sequential), **prefixed("projection_head.layers.", projector),
                       **prefixed("backbone_momentum.", sequential),
                       **prefixed("projection_head_momentum.layers.", projector)}
    n_head = len(projector.state_dict())
    return backbone, {
        "solo-learn": (lightning(solo, {}), "solo-learn or lightly benchmarks (Lightning)", "backbone.",
                       f"projector.* ({n_head}), predictor.* ({n_head}), classifier.* (2), momentum_backbone.* (120)"),
        "solo-learn, before 2022": (lightning(solo_old, {}), "solo-learn before 2022", "encoder.",
                                    "momentum_encoder.* (120)"),
        "lightly benchmark": (lightning(lightly_bench, {"batch_size_per_device": 128, "num_classes": 1000}),
                              "solo-learn or lightly benchmarks (Lightning)", "backbone.",
                              f"projection_head.* ({n_head}), key_backbone.* (120)"),
        "lightly example": (lightly_example, "lightly examples (nn.Sequential of torchvision's children)",
                            "backbone.0., backbone.1., backbone.4., backbone.5., backbone.6., backbone.7.",
                            "backbone_momentum.* (120)"),
    }


# ------------------------------------------------------------------------------------ reading
@pytest.mark.slow
@pytest.mark.parametrize("name", ["solo-learn", "solo-learn, before 2022", "lightly benchmark", "lightly example"])
def test_foreign_checkpoints_load_and_give_the_source_features(name, tmp_path, capsys):
    """The backbone's 120 tensors are used, every head and momentum copy ignored, and the loaded
    backbone computes the source network's features (what the bridge is for)."""
    source, layouts = foreign_checkpoints()
    ckpt, layout, prefixes, ignored = layouts[name]
    torch.save(ckpt, tmp_path / "ckpt.pth")  # Lightning dicts: must load under weights_only=True
    backbone, _ = linear_eval.load_backbone(str(tmp_path / "ckpt.pth"), "resnet18", "auto")
    out = capsys.readouterr().out
    assert f"{layout}, arch resnet18, imagenet stem; used 120 keys ({prefixes})" in out
    state = ckpt.get("state_dict", ckpt)
    assert f"ignored {len(state) - 120}: " in out and ignored in out
    x = torch.randn(2, 3, 32, 32)  # ImageNet stem: 1×1 at layer4, enough to compare
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), source(x).flatten(1), rtol=0, atol=0)


@pytest.mark.slow
def test_solo_learn_cifar_stem_pads_conv1_by_two(tmp_path, capsys):
    """solo-learn's CIFAR conv1 pads by 2 (ours by 1): the same weights, other features. The loaded
    backbone must pad by 2 to give solo-learn's features, and the torchvision export says so."""
    source, layouts = foreign_checkpoints(stem="cifar")
    torch.save(layouts["solo-learn"][0], tmp_path / "solo.ckpt")
    backbone, _ = linear_eval.load_backbone(str(tmp_path / "solo.ckpt"), "resnet18", "auto")
    assert "conv1 padding 2, arch resnet18, cifar stem" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), source(x), rtol=0, atol=0)
        backbone.encoder.conv1.padding = (1, 1)
        assert not torch.allclose(backbone(x), source(x))  # the padding matters
    linear_eval.main(["--data", "synthetic:16", "--pretrained", str(tmp_path / "solo.ckpt"), "-a", "resnet18",
                      "--output-dir", str(tmp_path), "--export", str(tmp_path / "r18.pth")])
    assert "nn.Conv2d(3, 64, 3, 1, 2, bias=False)" in capsys.readouterr().out


def pickled_lightning_checkpoint(tmp_path) -> str:
    """A Lightning checkpoint whose hyper_parameters pickle an object (here argparse.Namespace, as a module saving
    its args does): code, not tensors."""
    _, layouts = foreign_checkpoints()
    torch.save({**layouts["solo-learn"][0], "hyper_parameters": argparse.Namespace(lr=0.3)}, tmp_path / "pickled.ckpt")
    return str(tmp_path / "pickled.ckpt")


def test_pickled_hyper_parameters_are_refused_in_one_line(tmp_path, monkeypatch):
    path = pickled_lightning_checkpoint(tmp_path)
    monkeypatch.setattr(argparse.Namespace, "__setstate__", lambda self, state: pytest.fail("unpickled an object"),
                        raising=False)
    with pytest.raises(SystemExit, match=r"^linear_eval.py: --pretrained: cannot read '.*pickled.ckpt' as a "
                                         r"tensors-only checkpoint: UnpicklingError: ") as err:
        linear_eval.load_backbone(path, "resnet18", "auto")
    assert "\n" not in str(err.value)


def test_the_refusal_gives_no_advice_to_load_it_unsafely(tmp_path):
    """Torch's message goes on to say the file can still be loaded (unsafely, with terminal escapes): the line keeps
    its first sentence only."""
    with pytest.raises(SystemExit) as err:
        linear_eval.load_backbone(pickled_lightning_checkpoint(tmp_path), "resnet18", "auto")
    assert str(err.value).endswith("tensors-only checkpoint: UnpicklingError: Weights only load failed")
    assert "\x1b" not in str(err.value) and "can still be loaded" not in str(err.value)


def test_an_unknown_foreign_layout_lists_its_key_prefixes(tmp_path):
    """lightly's own CIFAR ResNet (lightly.models.ResNetGenerator: layer1 at index 2, `shortcut`
    instead of `downsample`) is not a torchvision ResNet: one line with the prefixes found."""
    state = {"backbone.0.weight": torch.zeros(64, 3, 3, 3), "backbone.1.weight": torch.zeros(64),
             "backbone.2.0.conv1.weight": torch.zeros(64, 64, 3, 3), "projection_head.layers.0.weight": torch.zeros(2, 2)}
    torch.save({"state_dict": state}, tmp_path / "generator.ckpt")
    with pytest.raises(SystemExit, match=r"has no known backbone layout .*; key prefixes found: "
                                         r"backbone\.\* \(3\), projection_head\.\* \(1\)$"):
        linear_eval.load_backbone(str(tmp_path / "generator.ckpt"), "resnet18", "auto")


# ------------------------------------------------------------------------------- detectron2
# Hand-written from detectron2's ResNet (modeling/backbone/resnet.py@8f22855: BasicStem, BasicBlock,
# BottleneckBlock, stages res2-res5) against torchvision's names: (ours, detectron2's, shape).
DETECTRON2_TABLE = {
    "resnet18": (120, [("conv1.weight", "stem.conv1.weight", (64, 3, 7, 7)),
                       ("bn1.running_var", "stem.conv1.norm.running_var", (64,)),
                       ("layer1.0.conv1.weight", "res2.0.conv1.weight", (64, 64, 3, 3)),
                       ("layer1.1.bn2.bias", "res2.1.conv2.norm.bias", (64,)),
                       ("layer2.0.downsample.0.weight", "res3.0.shortcut.weight", (128, 64, 1, 1)),
                       ("layer2.0.downsample.1.running_mean", "res3.0.shortcut.norm.running_mean", (128,)),
                       ("layer4.1.conv2.weight", "res5.1.conv2.weight", (512, 512, 3, 3))]),
    "resnet50": (318, [("conv1.weight", "stem.conv1.weight", (64, 3, 7, 7)),
                       ("bn1.weight", "stem.conv1.norm.weight", (64,)),
                       ("layer1.0.conv3.weight", "res2.0.conv3.weight", (256, 64, 1, 1)),
                       ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight", (256, 64, 1, 1)),
                       ("layer2.0.conv2.weight", "res3.0.conv2.weight", (128, 128, 3, 3)),  # stride here: STRIDE_IN_1X1 False
                       ("layer3.5.bn2.num_batches_tracked", "res4.5.conv2.norm.num_batches_tracked", ()),
                       ("layer4.2.bn3.running_var", "res5.2.conv3.norm.running_var", (2048,))]),
}


def torchvision_name(key: str) -> str:
    """detectron2's name back to torchvision's, written independently of linear_eval.export's renaming."""
    parts = key.split(".")
    if parts[0] == "stem":
        parts = parts[1:]
    else:
        parts[0] = f"layer{int(parts[0][3:]) - 1}"
    out = []
    for part in parts:
        if part == "norm":  # convK.norm -> bnK, shortcut.norm -> downsample.1
            out[-1] = "downsample.1" if out[-1] == "downsample.0" else "bn" + out[-1][4:]
        else:
            out.append("downsample.0" if part == "shortcut" else part)
    return ".".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_export_names_shapes_and_round_trip(arch, tmp_path, capsys):
    source = randomised(models.__dict__[arch]())
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    linear_eval.main(["--data", "synthetic:16", "--pretrained", str(tmp_path / "tv.pth"), "-a", arch,
                      "--output-dir", str(tmp_path), "--export", str(tmp_path / "d2.pkl"), "--export-format", "detectron2"])
    assert f"in detectron2's names ({DETECTRON2_TABLE[arch][0]} arrays)" in capsys.readouterr().out
    if arch == "resnet18":  # plain pickle in a fresh interpreter: it must not need torch (no torch objects inside)
        (tmp_path / "check.py").write_text(
            "import pickle, sys, numpy; d = pickle.load(open(sys.argv[1], 'rb'))\n"
            "assert 'torch' not in sys.modules, 'unpickling imported torch'\n"
            "assert set(d) == {'model', '__author__', 'matching_heuristics'} and d['matching_heuristics'] is True\n"
            "assert isinstance(d['__author__'], str)\n"
            "assert all(isinstance(k, str) and type(v) is numpy.ndarray for k, v in d['model'].items())\n")
        proc = run_script(str(tmp_path / "check.py"), tmp_path / "d2.pkl", timeout=30)
        assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "d2.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    count, table = DETECTRON2_TABLE[arch]
    assert len(model) == count
    for ours, theirs, shape in table:
        assert model[theirs].shape == shape, theirs
        assert torch.equal(torch.from_numpy(model[theirs]), source.state_dict()[ours]), theirs
    back = {torchvision_name(k): torch.from_numpy(v) for k, v in model.items()}
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in expected.items())
