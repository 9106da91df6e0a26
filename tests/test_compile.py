"""--compile: torch.compile of the ResNet encoders, in place, in the six training scripts and linear_eval.py.

Inductor writes its own kernels for the BN statistics and the convolutions' backward, so float sums
run in another order than eager PyTorch's: a compiled run equals an eager one to float32 rounding,
not bit for bit (measured on CPU, SimSiam, 2 steps at lr 0.05 and 0.5: largest weight or
BN-statistic difference 5e-7 to 7e-7, losses 6e-8 to 7e-8 apart). The slow test asserts that closeness; the fast one, with the compiler
replaced by a recorder, that every script compiles exactly its ResNets and saves the keys it saves
without the flag."""
import random
from functools import partial

import pytest
import torch
import torch.nn as nn
import torchvision.models as models

import byol
import cmc
import insdis
import linear_eval
import moco
import simclr
import simsiam
from test_errors import ARGV

MODULES = {"moco": moco, "simclr": simclr, "byol": byol, "simsiam": simsiam, "insdis": insdis, "cmc": cmc,
           "linear_eval": linear_eval}
ENCODERS = {"moco": 2, "simclr": 1, "byol": 2, "simsiam": 1, "insdis": 1, "cmc": 2, "linear_eval": 1}  # online + target, q + k, L + ab
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", MODULES)
def test_compile_is_off_by_default_and_compiles_each_resnet_in_place(name, tmp_path, monkeypatch):
    module = MODULES[name]
    assert module.parse_args(["--data", "synthetic"]).compile is False
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))  # eager, recorded
    argv = ARGV[name] + ["--output-dir", str(tmp_path / "on"), "--compile"]
    module.main(argv + (["--knn"] if name == "linear_eval" else []))
    assert len(compiled) == ENCODERS[name] and all(isinstance(net, models.ResNet) for net in compiled)
    if name == "cmc":
        assert sorted(net.conv1.in_channels for net in compiled) == [1, 2]
    if name == "linear_eval":
        return  # --knn writes no checkpoint; the probe's keys are the classifier's
    module.main(ARGV[name] + ["--output-dir", str(tmp_path / "off")])
    on, off = (torch.load(tmp_path / run / "checkpoint.pth.tar", weights_only=True) for run in ("on", "off"))
    assert list(on["state_dict"]) == list(off["state_dict"])  # no `_orig_mod.`: loads with or without the flag
    assert on["args"]["compile"] and not off["args"]["compile"]


SIMSIAM = ["--data", "synthetic:32", "-a", "resnet18", "-b", "16", "--image-size", "16", "-j", "0", "-p", "1",
           "--seed", "0", "--knn-every", "0", "--dim", "32", "--pred-dim", "16", "--epochs", "1", "--lr", "0.5"]


@pytest.mark.slow  # ~2.5 min on 2 shared cores: inductor compiles a ResNet-18 forward and backward in C++
def test_a_compiled_run_equals_the_eager_run_to_float32_rounding(tmp_path, capsys):
    for run, flags in (("eager", []), ("compiled", ["--compile"])):
        simsiam.main(SIMSIAM + ["--output-dir", str(tmp_path / run), *flags])
    eager, compiled = (torch.load(tmp_path / run / "checkpoint.pth.tar", weights_only=True) for run in ("eager", "compiled"))
    losses = [float((tmp_path / run / "log.txt").read_text().split('"loss": ')[1].split(",")[0]) for run in ("eager", "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    torch.manual_seed(0), random.seed(0)  # main() seeds, then builds the model: the weights both runs started from
    start = simsiam.SimSiam(partial(simsiam.resnet, "resnet18", "cifar"), 32, 16).state_dict()
    moved = max((eager["state_dict"]["module." + k] - v).abs().max().item() for k, v in start.items() if v.is_floating_point())
    assert moved > 1e-2  # the two steps moved the weights 1000× further than the tolerance below
    assert list(compiled["state_dict"]) == list(eager["state_dict"])
    for key, value in eager["state_dict"].items():  # weights, BN statistics (num_batches_tracked exactly)
        torch.testing.assert_close(compiled["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)

    # the checkpoint of a compiled run is read by linear_eval.py, with or without --compile, to the same kNN
    ckpt = str(tmp_path / "compiled" / "checkpoint.pth.tar")
    knn = ["--data", "synthetic:40", "--image-size", "16", "-j", "0", "-b", "10", "--pretrained", ckpt, "--knn"]
    eager_knn, compiled_knn = linear_eval.main(knn), linear_eval.main(knn + ["--compile"])
    assert compiled_knn["knn_acc1"] == pytest.approx(eager_knn["knn_acc1"], abs=1e-4)
