"""The CIFAR stem and the online kNN monitor, parametrized over the six pre-training scripts."""
import inspect
import random
from functools import partial

import pytest
import torch
import torch.nn as nn
import torchvision

import byol
import cmc
import common
import insdis
import linear_eval
import moco
import simclr
import simsiam

MODULES = {"moco": moco, "simclr": simclr, "byol": byol, "simsiam": simsiam, "insdis": insdis, "cmc": cmc}
BUILD = {  # the script's model with a tiny head: base_encoder -> model
    "moco": lambda base: moco.MoCo(base, dim=16, K=64),
    "simclr": lambda base: simclr.SimCLR(base, 16),
    "byol": lambda base: byol.BYOL(base, 16, 32),
    "simsiam": lambda base: simsiam.SimSiam(base, 16, 8),
    "insdis": lambda base: insdis.InsDis(base, 64, 16, 8),
    "cmc": lambda base: cmc.CMC(base, 64, 16, 8),
}
FLAGS = {"moco": ["--moco-k", "64"], "simclr": [], "byol": ["--dim", "16", "--hidden-dim", "32"],
         "simsiam": ["--dim", "32", "--pred-dim", "16"], "insdis": ["--nce-k", "16"], "cmc": ["--nce-k", "16"]}
# 32 train / 10 val images of 16 px: the auto stem is the CIFAR one
RUN = ["--data", "synthetic:32", "-a", "resnet18", "-b", "16", "--image-size", "16", "-j", "0", "-p", "100"]
SCAFFOLD = ["resnet", "pooled", "knn_loaders", "knn_monitor"]
each_script = pytest.mark.parametrize("name", list(MODULES), ids=list(MODULES))
pytestmark = pytest.mark.usefixtures("one_thread")


@each_script
def test_both_stems_build_with_the_right_shapes(name):
    module = MODULES[name]
    assert module.parse_args(["--data", "synthetic"]).stem == "cifar"  # 32 px
    assert module.parse_args(["--data", "synthetic", "--image-size", "64"]).stem == "imagenet"
    assert module.parse_args(["--data", "synthetic", "--stem", "imagenet"]).stem == "imagenet"
    width = 1024 if name == "cmc" else 512  # CMC: two encoders, concatenated
    for stem, conv1_kernel, layer4_side in (("cifar", 3, 4), ("imagenet", 7, 1)):
        model = BUILD[name](partial(module.resnet, "resnet18", stem)).eval()
        encoders = [model.encoder_l, model.encoder_ab] if name == "cmc" else [
            model.encoder_q if name == "moco" else model.encoder]
        for encoder in encoders:
            assert encoder.conv1.kernel_size == (conv1_kernel, conv1_kernel)
            assert isinstance(encoder.maxpool, nn.Identity) == (stem == "cifar")
        x = torch.randn(2, 3, 32, 32)
        layer4 = []
        encoders[0].layer4.register_forward_hook(lambda m, i, out: layer4.append(out.shape[-1]))
        with torch.no_grad():
            assert module.backbone_features(model, x).shape == (2, width)
        assert layer4 == [layer4_side]  # 32 px: 4×4 with the CIFAR stem, 1×1 with torchvision's
    if name == "cmc":
        assert [model.encoder_l.conv1.in_channels, model.encoder_ab.conv1.in_channels] == [1, 2]


def test_the_scaffold_of_stem_and_monitor_is_one_text_in_every_script():
    for fn in SCAFFOLD:
        sources = {name: inspect.getsource(getattr(m, fn)) for name, m in MODULES.items()}
        assert len(set(sources.values())) == 1, fn


def train(name, tmp_path, *flags):
    """One in-process run from the same global RNG state (no --seed: a drawn random number would show)."""
    torch.manual_seed(0), random.seed(0)
    MODULES[name].main(RUN + FLAGS[name] + ["--epochs", "2", "--output-dir", str(tmp_path), *flags])
    return torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)


def log_lines(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@each_script
def test_monitor_leaves_training_unchanged_and_equals_linear_eval_knn(name, tmp_path, capsys):
    on = train(name, tmp_path / "on", "--knn-every", "1")
    off = train(name, tmp_path / "off", "--knn-every", "0")
    assert on["args"]["stem"] == "cifar" and on["args"]["knn_every"] == 1
    for key, value in on["state_dict"].items():  # weights, BN statistics, queue/banks
        assert torch.equal(value, off["state_dict"][key]), key
    monitored = [line["knn_acc1"] for line in log_lines(tmp_path / "on" / "log.txt")]
    assert len(monitored) == 2 and "knn_acc1" not in (tmp_path / "off" / "log.txt").read_text()
    assert f" * kNN Acc@1 {monitored[-1]:.2f} (epoch 1" in capsys.readouterr().out

    ckpt = str(tmp_path / "on" / "checkpoint.pth.tar")
    evaluate = ["--data", "synthetic:32", "--image-size", "16", "-j", "0", "-b", "16", "--pretrained", ckpt]
    knn = linear_eval.main(evaluate + ["--knn"])
    assert knn["knn_acc1"] == pytest.approx(monitored[-1], abs=1e-4)
    probe = linear_eval.main(evaluate + ["--epochs", "1", "--lr", "0.1", "--output-dir", str(tmp_path / "probe")])
    assert 0 <= probe["acc1"] <= 100
    assert "cifar stem" in capsys.readouterr().out
    if name == "cmc":
        return  # two encoders: --export refuses (tested in test_cmc)
    linear_eval.main(evaluate + ["--export", str(tmp_path / "r18.pth")])
    assert "conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = nn.Identity()" in capsys.readouterr().out
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_linear_eval_reads_the_stem_of_a_foreign_checkpoint_from_conv1(tmp_path, capsys):
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    backbone, _ = linear_eval.load_backbone(str(tmp_path / "plain.pth"), "resnet18", True)
    assert backbone.stem == "cifar" and isinstance(backbone.encoder.maxpool, nn.Identity)
    with pytest.raises(SystemExit, match=r"has the cifar stem \(conv1 \(64, 3, 3, 3\)\), not --stem imagenet"):
        linear_eval.load_backbone(str(tmp_path / "plain.pth"), "resnet18", True, "imagenet")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    assert linear_eval.load_backbone(str(tmp_path / "tv.pth"), "resnet18", True)[0].stem == "imagenet"
    assert linear_eval.Backbone("resnet18", "Lab", "cifar").encoder_l.conv1.weight.shape == (64, 1, 3, 3)


def _monitor_on_ranks(rank, world_size, out_dir):
    torch.manual_seed(0)  # the same weights on every rank
    args = simclr.parse_args(["--data", "synthetic:40", "-b", "8", "--image-size", "16", "-j", "0"])
    model = simclr.SimCLR(partial(simclr.resnet, "resnet18", args.stem), 16)
    loaders = simclr.knn_loaders(args, rank, world_size)  # 8 val images: 4 per rank, then padding
    value = simclr.knn_monitor(model, loaders, torch.device("cpu"), args)
    (out_dir / f"rank{rank}_of{world_size}").write_text(repr(value))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_monitor_on_ranks)
def test_two_ranks_gather_their_shards_and_print_the_same_number_as_one(gloo_dir, tmp_path):
    _monitor_on_ranks(0, 1, tmp_path)
    values = {p.name: float(p.read_text()) for folder in (tmp_path, gloo_dir) for p in folder.iterdir()}
    assert values["rank0_of2"] == values["rank1_of2"] == pytest.approx(values["rank0_of1"], abs=1e-4)


def test_knn_accuracy_votes_by_weighted_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    batches = [(train, torch.tensor([0, 0, 1, 1]), torch.arange(4))]
    val = [(torch.tensor([[0.8, 0.2], [0.2, 0.8], [1.0, 0.1]]), torch.tensor([0, 1, 1]), torch.arange(3))]

    class Loader(list):
        dataset = property(lambda self: range(sum(len(b[2]) for b in self)))

    acc1, acc5 = common.knn_accuracy(nn.Identity(), Loader(batches), Loader(val), torch.device("cpu"), k=2, T=0.1)
    assert float(acc1) == pytest.approx(200 / 3) and float(acc5) == 100.0  # the third is voted class 0


@each_script
@pytest.mark.parametrize("flag, value", [("--knn-every", "-1"), ("--knn-k", "0"), ("--knn-t", "0")])
def test_bad_monitor_flags_are_one_line_errors(name, flag, value, capsys):
    with pytest.raises(SystemExit) as err:
        MODULES[name].parse_args(["--data", "synthetic", flag, value])
    assert err.value.code == 2
    assert "error: the kNN monitor needs --knn-every >= 0, --knn-k >= 1 and --knn-t > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --stem takes only its three choices
        MODULES[name].parse_args(["--data", "synthetic", "--stem", "tiny"])
