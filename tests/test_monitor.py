"""The CIFAR stem and the online kNN monitor, parametrized over the six pre-training scripts."""
import inspect
import json
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
FLAGS = {"moco": ["--moco-k", "16", "--moco-dim", "8"], "simclr": ["--proj-out-dim", "8"],
         "byol": ["--dim", "8", "--hidden-dim", "16"], "simsiam": ["--dim", "16", "--pred-dim", "8"],
         "insdis": ["--nce-k", "4", "--feat-dim", "8"], "cmc": ["--nce-k", "4", "--feat-dim", "8"]}
# 8 train / 10 val images of 8 px, one step an epoch: the auto stem is the CIFAR one
DATA = ["--data", "synthetic:8", "--image-size", "8", "-j", "0", "-b", "8"]
RUN = DATA + ["-a", "resnet18", "-p", "100"]
each_script = pytest.mark.parametrize("name", list(MODULES), ids=list(MODULES))
pytestmark = pytest.mark.usefixtures("one_thread")


def features(name, model, x):
    """What each script hands the monitor: the pooled backbone (CMC: both encoders', concatenated)."""
    if name == "cmc":
        return cmc.backbone_features(model, x)
    return MODULES[name].pooled(model.encoder_q if name == "moco" else model.encoder, x)


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
            assert features(name, model, x).shape == (2, width)
        assert layer4 == [layer4_side]  # 32 px: 4×4 with the CIFAR stem, 1×1 with torchvision's
    if name == "cmc":
        assert [model.encoder_l.conv1.in_channels, model.encoder_ab.conv1.in_channels] == [1, 2]


def test_resnet_and_pooled_are_one_text_in_the_six_training_scripts():
    for fn in ("resnet", "pooled"):
        sources = {name: inspect.getsource(getattr(m, fn)) for name, m in MODULES.items()}
        assert len(set(sources.values())) == 1, fn


def train(name, tmp_path, *flags):
    """One in-process run from the same global RNG state (no --seed: a drawn random number would show)."""
    torch.manual_seed(0), random.seed(0)
    MODULES[name].main(RUN + FLAGS[name] + ["--epochs", "2", "--output-dir", str(tmp_path), *flags])
    return torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)


def log_lines(path):
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
    assert f" * kNN Acc@1 {monitored[-1]:.2f} (epoch 1, backbone, k=200, T=0.07)" in capsys.readouterr().out

    evaluate = DATA + ["--pretrained", str(tmp_path / "on" / "checkpoint.pth.tar")]
    knn = linear_eval.main(evaluate + ["--knn", "--output-dir", str(tmp_path / "eval")])
    assert knn["knn_acc1"] == pytest.approx(monitored[-1], abs=1e-4)
    assert "cifar stem" in capsys.readouterr().out
    if name == "cmc":
        return  # two encoders: --export refuses (tested in test_cmc)
    linear_eval.main(evaluate + ["--export", str(tmp_path / "r18.pth"), "--output-dir", str(tmp_path / "eval")])
    assert "conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = nn.Identity()" in capsys.readouterr().out
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_linear_eval_reads_the_stem_of_a_foreign_checkpoint_from_conv1(tmp_path, capsys):
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    backbone, _ = linear_eval.load_backbone(str(tmp_path / "plain.pth"), "resnet18", "auto")
    assert backbone.stem == "cifar" and isinstance(backbone.encoder.maxpool, nn.Identity)
    with pytest.raises(SystemExit, match=r"has the cifar stem \(conv1 \(64, 3, 3, 3\)\), not --stem imagenet"):
        linear_eval.load_backbone(str(tmp_path / "plain.pth"), "resnet18", "imagenet")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    assert linear_eval.load_backbone(str(tmp_path / "tv.pth"), "resnet18", "auto")[0].stem == "imagenet"
    assert linear_eval.Backbone("resnet18", "Lab", "cifar").encoder_l.conv1.weight.shape == (64, 1, 3, 3)


# 55 train / 11 val images: on two ranks each split ends with a padding duplicate of the sampler
MONITOR = ["--data", "synthetic:55", "-b", "8", "--image-size", "16", "-j", "0", "--epochs", "3", "--knn-every", "2"]


def _monitor_on_ranks(rank, world_size, out_dir):
    torch.manual_seed(0)  # the same weights on every rank
    args = simclr.parse_args(MONITOR)
    model = simclr.SimCLR(partial(simclr.resnet, "resnet18", args.stem), 16)
    loaders = common.knn_loaders(args, rank, world_size)
    lines = []
    value = common.knn_monitor(model, partial(simclr.pooled, model.encoder), loaders, torch.device("cpu"),
                               simclr.concat_all_gather, args, 1, lines.append)  # epoch 1: (1 + 1) % 2 == 0
    (out_dir / f"rank{rank}_of{world_size}").write_text(json.dumps({**value, "lines": lines}))


@pytest.mark.slow
@pytest.mark.gloo_worker(worker=_monitor_on_ranks)
def test_two_ranks_gather_their_shards_and_print_the_same_number_as_one(gloo_dir, tmp_path):
    _monitor_on_ranks(0, 1, tmp_path)
    values = {p.name: json.loads(p.read_text()) for folder in (tmp_path, gloo_dir) for p in folder.iterdir()}
    one = values["rank0_of1"]
    assert set(one) == {"knn_acc1", "lines"} and one["lines"] == [
        f" * kNN Acc@1 {one['knn_acc1']:.2f} (epoch 1, backbone, k=200, T=0.07)"]
    assert values["rank0_of2"]["knn_acc1"] == values["rank1_of2"]["knn_acc1"] == pytest.approx(one["knn_acc1"],
                                                                                               abs=1e-4)


def test_monitor_runs_every_knn_every_epochs_and_after_the_last_in_eval_mode_drawing_nothing():
    torch.manual_seed(0)
    args = simclr.parse_args(MONITOR)
    assert simclr.parse_args(["--data", "synthetic"]).knn_every == 1  # built-in data: on by default
    assert simclr.parse_args(["--data", "/images"]).knn_every == 0  # an image folder's labels may be placeholders
    model = simclr.SimCLR(partial(simclr.resnet, "resnet18", args.stem), 16).train()
    seen = []

    def embed(x):  # records the mode the backbone is evaluated in
        seen.append(model.training)
        return simclr.pooled(model.encoder, x)

    images = torch.rand(6, 3, 16, 16)
    loader = [(images, torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6))]

    class Loader(list):
        dataset = range(6)

    loaders = [Loader(loader), Loader(loader)]
    state, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    due = {epoch: common.knn_monitor(model, embed, loaders, torch.device("cpu"), simclr.concat_all_gather, args,
                                     epoch, lambda line: None) for epoch in range(3)}
    assert due[0] == {} and set(due[1]) == set(due[2]) == {"knn_acc1"}  # every 2nd epoch, and the last (3 of 3)
    assert seen and not any(seen) and model.training  # eval mode while it embeds, train mode after
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics too
    assert common.knn_monitor(model, embed, None, torch.device("cpu"), None, args, 2) == {}  # --knn-every 0


def test_knn_accuracy_votes_by_weighted_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    batches = [(train, torch.tensor([0, 0, 1, 1]), torch.arange(4))]
    val = [(torch.tensor([[0.8, 0.2], [0.2, 0.8], [1.0, 0.1]]), torch.tensor([0, 1, 1]), torch.arange(3))]

    class Loader(list):
        dataset = property(lambda self: range(sum(len(b[2]) for b in self)))

    acc1, acc5 = common.knn_accuracy(nn.Identity(), Loader(batches), Loader(val), torch.device("cpu"), k=2, T=0.1)
    assert float(acc1) == pytest.approx(200 / 3) and float(acc5) == 100.0  # the third is voted class 0


@each_script
def test_bad_monitor_flags_are_one_line_errors(name, capsys):
    with pytest.raises(SystemExit) as err:
        MODULES[name].parse_args(["--data", "synthetic", "--knn-every", "-1"])
    assert err.value.code == 2
    assert "error: argument --knn-every: must be in [0, inf] (got -1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --stem takes only its three choices
        MODULES[name].parse_args(["--data", "synthetic", "--stem", "tiny"])
    assert "argument --stem: invalid choice: 'tiny'" in capsys.readouterr().err
