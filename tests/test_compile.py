"""--compile: torch.compile of the ResNet encoders, in place, in the six training scripts and linear_eval.py.

The fast test replaces the compiler by a recorder: every script compiles exactly its ResNets, in place (no
`_orig_mod.` key). The slow one compiles for real with the aot_eager backend: TorchDynamo captures the encoder's
graphs and AOTAutograd traces forward and backward (BN's running statistics as functionalized buffer updates), which
is what a compiled run shares on any device; the generated kernels are the backend's (Triton on a GPU, C++ on a CPU,
where inductor takes 2-3 minutes cold on 2 cores to build a ResNet-18's). With eager kernels a compiled run equals
the eager one bit for bit (weights, BN statistics, losses, the kNN of linear_eval.py); inductor's own kernels sum in
another order (measured on CPU, SimSiam, 2 steps at lr 0.05 and 0.5: largest weight or BN-statistic difference 5e-7
to 7e-7, losses 6e-8 to 7e-8 apart). benchmarks/gpu_check.py runs the compile setting on a GPU."""
import json
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

MODULES = {"moco": moco, "simclr": simclr, "byol": byol, "simsiam": simsiam, "insdis": insdis, "cmc": cmc,
           "linear_eval": linear_eval}
ENCODERS = {"moco": 2, "simclr": 1, "byol": 2, "simsiam": 1, "insdis": 1, "cmc": 2, "linear_eval": 1}  # online + target, q + k, L + ab
RUN = ["--data", "synthetic:16", "-a", "resnet18", "-b", "8", "--image-size", "8", "-j", "0", "--epochs", "1"]
ARGV = {  # the smallest run of each script: 16 images, batch 8, 8 px, tiny heads
    "moco": RUN + ["--knn-every", "0", "--moco-k", "16", "--moco-dim", "8"],
    "simclr": RUN + ["--knn-every", "0", "--proj-out-dim", "8"],
    "byol": RUN + ["--knn-every", "0", "--dim", "8", "--hidden-dim", "8"],
    "simsiam": RUN + ["--knn-every", "0", "--dim", "8", "--pred-dim", "8"],
    "insdis": RUN + ["--knn-every", "0", "--nce-k", "4", "--feat-dim", "8"],
    "cmc": RUN + ["--knn-every", "0", "--nce-k", "4", "--feat-dim", "8"],
    "linear_eval": RUN + ["--knn"],  # a random-weight resnet18: its BN pass and the kNN run the compiled backbone
}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", MODULES)
def test_compile_is_off_by_default_and_compiles_each_resnet_in_place(name, tmp_path, monkeypatch):
    """The compiler replaced by a recorder and training by a stub (the training script's epoch ends at once): which
    networks each script compiles, and that it compiles them in place, so the checkpoint's keys are the eager ones."""
    module = MODULES[name]
    assert module.parse_args(["--data", "synthetic"]).compile is False
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))  # eager, recorded
    if name != "linear_eval":
        monkeypatch.setattr(module, "train_one_epoch", lambda *args, **kwargs: {"epoch": 0})
    module.main(ARGV[name] + ["--output-dir", str(tmp_path), "--compile"])
    assert len(compiled) == ENCODERS[name] and all(isinstance(net, models.ResNet) for net in compiled)
    if name == "cmc":
        assert sorted(net.conv1.in_channels for net in compiled) == [1, 2]
    if name == "linear_eval":
        return  # --knn writes no checkpoint; the probe's keys are the classifier's
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["args"]["compile"] and not any("_orig_mod." in key for key in ckpt["state_dict"])
    encoders = {"moco": ("encoder_q", "encoder_k"), "byol": ("encoder", "target_encoder"),
                "cmc": ("encoder_l", "encoder_ab")}.get(name, ("encoder",))
    for encoder in encoders:  # every compiled network's tensors under its eager name (DDP's "module." prefix)
        assert f"module.{encoder}.conv1.weight" in ckpt["state_dict"], encoder


SIMSIAM = ["--data", "synthetic:16", "-a", "resnet18", "-b", "8", "--image-size", "8", "-j", "0", "-p", "1",
           "--seed", "0", "--knn-every", "0", "--dim", "32", "--pred-dim", "16", "--epochs", "1", "--lr", "2"]


@pytest.fixture
def aot_eager(monkeypatch):
    """nn.Module.compile as the scripts call it (no arguments), with the aot_eager backend; the graphs it compiled."""
    graphs, real = [], nn.Module.compile
    aot = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot(gm, example_inputs)

    monkeypatch.setattr(nn.Module, "compile", lambda self, *args, **kwargs: real(self, *args, backend=backend))
    torch.compiler.reset()
    yield graphs
    torch.compiler.reset()


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_run_bit_for_bit(tmp_path, aot_eager):
    for run, flags in (("eager", []), ("compiled", ["--compile"])):
        simsiam.main(SIMSIAM + ["--output-dir", str(tmp_path / run), *flags])
        assert bool(aot_eager) == (run == "compiled")  # the encoder did run compiled
    eager, compiled = (torch.load(tmp_path / run / "checkpoint.pth.tar", weights_only=True) for run in ("eager", "compiled"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.txt").read_text().splitlines()]
              for run in ("eager", "compiled")]
    assert losses[1] == losses[0]
    torch.manual_seed(0), random.seed(0)  # main() seeds, then builds the model: the weights both runs started from
    start = simsiam.SimSiam(partial(simsiam.resnet, "resnet18", "cifar"), 32, 16).state_dict()
    moved = max((eager["state_dict"]["module." + k] - v).abs().max().item() for k, v in start.items() if v.is_floating_point())
    assert moved > 1e-2  # the two steps did move the weights
    assert list(compiled["state_dict"]) == list(eager["state_dict"])
    for key, value in eager["state_dict"].items():  # weights, BN statistics, num_batches_tracked
        assert torch.equal(compiled["state_dict"][key], value), key
    assert all(torch.equal(a, b) for a, b in zip(tensors(compiled["optimizer"]), tensors(eager["optimizer"])))

    # the checkpoint of a compiled run is read by linear_eval.py, with or without --compile, to the same kNN
    graphs = len(aot_eager)
    knn = ["--data", "synthetic:16", "--image-size", "8", "-j", "0", "-b", "8", "--pretrained",
           str(tmp_path / "compiled" / "checkpoint.pth.tar"), "--knn", "--output-dir", str(tmp_path / "knn")]
    eager_knn, compiled_knn = linear_eval.main(knn), linear_eval.main(knn + ["--compile"])
    assert len(aot_eager) > graphs and compiled_knn == eager_knn


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)
