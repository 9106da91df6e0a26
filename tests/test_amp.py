"""--amp and --channels-last in every script: bf16 stays inside the encoders (similarities, softmax,
losses, queue and banks in float32) and the convolutions run channels-last."""
import pytest
import torch
import torch.nn as nn

import byol
import cmc
import insdis
import moco
import simclr
import simsiam

# one step of 8 images at 16 px (bf16 convolutions are slow on a CPU without bf16 units)
SMALL = ["--data", "synthetic:8", "-a", "resnet18", "-b", "8", "--image-size", "16", "-j", "0", "--seed", "0"]
SMALL += ["--stem", "imagenet", "--knn-every", "0"]  # the CIFAR stem and the monitor: test_monitor.py
RUNS = {
    moco: ["--moco-k", "16", "--moco-dim", "8"],
    simclr: ["--warmup-epochs", "1", "--proj-out-dim", "8"],
    byol: ["--dim", "8", "--hidden-dim", "16", "--warmup-epochs", "1"],
    simsiam: ["--dim", "16", "--pred-dim", "8"],
    insdis: ["--nce-k", "4", "--feat-dim", "8"],
    cmc: ["--nce-k", "4", "--feat-dim", "8"],
}
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """Stands in for a torchvision ResNet: `num_classes` sets the output, `conv1` (CMC replaces
    it) and `fc` the head."""

    def __init__(self, num_classes: int = 8, norm_layer=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, bias=False)  # CMC swaps in a 64-channel conv1
        self.body = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.conv1(x)))


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


def record_dtype(module: nn.Module, seen: list):
    module.register_forward_hook(lambda mod, inputs, output: seen.append(output.dtype))


@pytest.mark.slow
@pytest.mark.parametrize("script", list(RUNS), ids=lambda s: s.__name__)
def test_amp_channels_last_run_keeps_float32_state(script, tmp_path):
    script.main(SMALL + RUNS[script] + ["--amp", "--channels-last", "--epochs", "1", "--output-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["amp"] and ckpt["args"]["channels_last"]
    floats = [t for t in tensors(ckpt) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)  # weights, optimizer state, queue, banks
    convs = [t for key, t in ckpt["state_dict"].items() if key.endswith("conv1.weight")]
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) for t in convs)


def test_moco_logits_float32_while_encoder_runs_bf16():
    torch.manual_seed(0)
    model = moco.MoCo(TinyNet, dim=8, K=16, T=0.07)
    seen, q = [], []
    record_dtype(model.encoder_q, seen)
    model.encoder_q.register_forward_hook(lambda mod, inputs, output: q.append(output))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, k = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    assert seen == [torch.bfloat16]  # the encoder did run in bf16 ...
    assert logits.dtype == torch.float32 and k.dtype == torch.float32  # ... its similarities did not
    q = torch.nn.functional.normalize(q[0].double(), dim=1)  # reference in float64 from the bf16 output
    expected = torch.cat([(q * k.double()).sum(1, keepdim=True), q @ model.queue.double()], dim=1) / 0.07
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)  # a bf16 q @ queue is off by ~5e-2


@pytest.mark.parametrize("softmax", [False, True])
def test_bank_scores_float32_while_encoder_runs_bf16(softmax):
    torch.manual_seed(0)
    ins = insdis.InsDis(TinyNet, 20, dim=8, K=5, T=0.1, softmax=softmax)
    two = cmc.CMC(TinyNet, 20, dim=8, K=5, T=0.1, softmax=softmax)
    seen = []
    for encoder in (ins.encoder, two.encoder_l, two.encoder_ab):
        record_dtype(encoder, seen)
    index = torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = ins(torch.randn(4, 3, 8, 8), index) + two(torch.randn(4, 3, 8, 8), index)
    assert seen == [torch.bfloat16] * 3
    assert all(t.dtype == torch.float32 for t in outputs)  # scores (NCE P or logits) and features for the banks
    assert ins.Z.dtype == two.Z_l.dtype == torch.float32


def test_channels_last_converts_conv_weights_in_place():
    model = moco.MoCo(TinyNet, dim=8, K=16)
    params = list(model.parameters())
    model = model.to(memory_format=torch.channels_last)  # as main() does, before the optimizer
    assert model.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert model.queue.is_contiguous()  # 2-D buffers are left alone
