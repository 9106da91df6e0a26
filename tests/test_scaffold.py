"""Checks of the scaffold every script shares, parametrized over the six pre-training scripts."""
import signal
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import byol
import cmc
import insdis
import moco
import simclr
import simsiam
import test_byol
import test_cmc
import test_insdis
import test_moco
import test_simclr
import test_simsiam
from conftest import last_line, run_script
from test_errors import ARGV

NAN = float("nan")


def simclr_nan_loss(real):
    def nan_loss(z1, z2, tau):
        loss, logits, labels = real(z1, z2, tau)
        return loss * NAN, logits, labels
    return nan_loss


class Script(NamedTuple):
    module: object
    loss: str  # the loss function the NaN test replaces
    nan_loss: Callable  # real loss function -> stand-in whose loss is NaN
    tiny: list  # the short run of tests/test_<script>.py
    small_batch: list  # method flags a batch of 4 needs
    foreign: str  # the other method a foreign checkpoint claims to be


SCRIPTS = {
    "moco": Script(moco, "infonce_loss",
                   lambda real: lambda logits, labels: F.cross_entropy(logits, labels) * NAN,
                   test_moco.TINY, ["--moco-k", "8"], "simclr"),
    "simclr": Script(simclr, "nt_xent_loss", simclr_nan_loss, test_simclr.TINY, [], "moco"),
    "byol": Script(byol, "byol_loss", lambda real: lambda *out: real(*out) * NAN, test_byol.TINY, [], "moco"),
    "simsiam": Script(simsiam, "simsiam_loss", lambda real: lambda p1, p2, z1, z2: (p1.sum() + p2.sum()) * NAN,
                      test_simsiam.TINY, [], "moco"),
    "insdis": Script(insdis, "nce_loss", lambda real: lambda P, n_data: P.sum() * NAN,
                     test_insdis.TINY, ["--nce-k", "2"], "cmc"),
    "cmc": Script(cmc, "cmc_loss", lambda real: lambda *a: tuple(t * NAN for t in real(*a)),
                  test_cmc.TINY, ["--nce-k", "2"], "moco"),
}
# the official multi-process flags, with and without a value
GONE_FLAGS = [["--dist-url", "tcp://x:1"], ["--multiprocessing-distributed"], ["--gpu", "0"],
              ["--world-size", "1"], ["--rank", "0"]]
each_script = pytest.mark.parametrize("name", list(SCRIPTS), ids=list(SCRIPTS))
pytestmark = pytest.mark.usefixtures("one_thread")


@each_script
def test_batch_not_divisible_by_world_size(name, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as err:
        SCRIPTS[name].module.main(SCRIPTS[name].tiny + ["-b", "32", "--output-dir", str(tmp_path)])
    assert str(err.value) == f"{name}.py: global batch 32 does not divide by the world size 3"


@pytest.mark.slow
@each_script
def test_foreign_checkpoint_is_refused(name, tmp_path):
    script = SCRIPTS[name]
    torch.save({"method": script.foreign, "state_dict": {}, "epoch": 3}, tmp_path / "other.pth.tar")
    with pytest.raises(SystemExit) as err:
        script.module.main(script.tiny + ["--epochs", "1", "--output-dir", str(tmp_path),
                                          "--resume", str(tmp_path / "other.pth.tar")])
    assert str(err.value) == \
        f"{name}.py: '{tmp_path / 'other.pth.tar'}' is not a {name} checkpoint (found: {script.foreign})"


@each_script
def test_removed_official_flags_point_to_torchrun(name, capsys):
    for flag in GONE_FLAGS:
        with pytest.raises(SystemExit):
            SCRIPTS[name].module.parse_args(["--data", "synthetic", *flag])
        assert f"{flag[0]} is gone: launch with torchrun" in capsys.readouterr().err


@pytest.mark.slow
@each_script
def test_nan_loss_stops_and_keeps_the_last_checkpoint(name, tmp_path, monkeypatch):
    """On the smallest run (tests/test_errors.py: 16 images of 8 px, 2 steps an epoch): which loss turns NaN
    and where does not depend on the size, and the short run of tests/test_<script>.py trains 4 to 8 steps."""
    script = SCRIPTS[name]
    script.module.main(ARGV[name] + ["--output-dir", str(tmp_path)])  # --epochs 1
    before = (tmp_path / "checkpoint.pth.tar").read_bytes()
    log_before = (tmp_path / "log.txt").read_text()
    monkeypatch.setattr(script.module, script.loss, script.nan_loss(getattr(script.module, script.loss)))
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
    with pytest.raises(SystemExit) as err:
        script.module.main(ARGV[name] + ["--epochs", "2", "--output-dir", str(tmp_path), "--resume", "auto"])
    assert str(err.value).startswith(f"{name}.py: loss is nan at epoch 1 step 0; stopped")
    assert handlers == [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]  # given back
    assert (tmp_path / "checkpoint.pth.tar").read_bytes() == before
    assert (tmp_path / "log.txt").read_text() == log_before


@pytest.mark.slow
@each_script
def test_empty_folder_is_a_one_line_error(name, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = ["--data", str(tmp_path / "empty"), "-a", "resnet18", "-b", "4", *SCRIPTS[name].small_batch,
            "--output-dir", str(tmp_path / "out")]
    message = f"{name}.py: data folder '{tmp_path / 'empty'}' holds no images"
    with pytest.raises(SystemExit) as err:
        SCRIPTS[name].module.main(argv)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    proc = run_script(f"{name}.py", *argv)  # the command line prints that one line, no traceback
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert last_line(proc.stderr).startswith(message)


@pytest.mark.slow
@each_script
def test_unreadable_image_is_a_one_line_error(name, tmp_path):
    for c in ("a", "b"):
        (tmp_path / "bad" / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "bad" / c / f"{i}.jpg").write_bytes(b"not an image")
    # -j 2: a worker re-raises it with its traceback (the harder case), through the same except clause as -j 0;
    # so -j 0 (the main process) runs for moco only, each command line costing ~8 s on 2 cores
    for workers in ("0", "2") if name == "moco" else ("2",):
        proc = run_script(f"{name}.py", "--data", tmp_path / "bad", "-a", "resnet18", "-b", "4",
                          *SCRIPTS[name].small_batch, "-j", workers, "--image-size", "32",
                          "--output-dir", tmp_path / "out")
        assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert last_line(proc.stderr).startswith(f"{name}.py: cannot read image '"), proc.stderr
