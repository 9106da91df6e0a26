"""The shape every script keeps (shared/STYLE.md, issue 24) and what the shared code does in each of them: the
budgets, the columns, one SCAFFOLD text and one `__main__` block in all seven scripts, the method's class on the
first screen; a NaN loss stops each script's loop; a DataLoader worker's unreadable image is one line."""
import ast
import re
import signal

import pytest
import torch.nn.functional as F

import byol
import cmc
import insdis
import moco
import simclr
import simsiam
from conftest import ROOT, last_line, run_script
from test_errors import ARGV

SCRIPTS = ["moco", "simclr", "byol", "simsiam", "insdis", "cmc", "linear_eval"]
BUDGET = {"moco": 450, "simclr": 450, "byol": 450, "cmc": 450, "insdis": 450, "simsiam": 400, "linear_eval": 500,
          "common": 450}
CLASS = {"moco": "MoCo", "simclr": "SimCLR", "byol": "BYOL", "simsiam": "SimSiam", "insdis": "InsDis", "cmc": "CMC",
         "linear_eval": "Backbone"}
MARKER = "# ------------------------------------------ SCAFFOLD"
GUARD = '\n\nif __name__ == "__main__":'
NAN = float("nan")
pytestmark = pytest.mark.usefixtures("one_thread")


def source(name: str) -> str:
    return (ROOT / f"{name}.py").read_text()


def scaffold(name: str) -> str:
    text = source(name)
    return text[text.index(MARKER):text.index(GUARD)]


@pytest.mark.parametrize("name", [*SCRIPTS, "common"])
def test_line_budget_and_columns(name):
    lines = source(name).splitlines()
    assert len(lines) <= BUDGET[name], f"{name}.py has {len(lines)} lines, its budget is {BUDGET[name]}"
    wide = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not wide, f"{name}.py: lines over 120 columns: {wide}"


def test_the_scaffold_is_one_text_of_at_most_120_lines_at_the_bottom_of_every_script():
    texts = {name: scaffold(name) for name in SCRIPTS}
    assert len(set(texts.values())) == 1, "the SCAFFOLD block differs between scripts"
    assert len(texts["moco"].rstrip("\n").splitlines()) <= 120
    guards = {source(name)[source(name).index(GUARD):] for name in SCRIPTS}
    assert len(guards) == 1, "the __main__ block differs between scripts"
    for name in SCRIPTS:  # nothing of the script's own after it, and no second marker
        assert source(name).count(MARKER) == 1 and source(name).index(MARKER) > source(name).index("def main(")


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_docstring_is_short_names_the_paper_and_the_page_and_the_method_comes_first(name):
    tree = ast.parse(source(name))
    doc = ast.get_docstring(tree, clean=False)
    assert tree.body[0].end_lineno <= 12 and f"docs/{name}.md" in doc  # source lines
    if name != "linear_eval":
        assert re.search(r"arXiv:\d{4}\.\d{5}", doc) and "torchrun" in doc
    first = next(node for node in tree.body if isinstance(node, ast.ClassDef))
    assert first.name == CLASS[name] and first.lineno <= 80, (first.name, first.lineno)
    order = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert order.index("train_one_epoch") < order.index("parse_args") < order.index("main") < order.index("fail")


def test_the_backbone_is_built_and_read_in_one_place():
    """One function builds the backbone and one returns its features, the same text in the six training scripts."""
    training = [moco, simclr, byol, simsiam, insdis, cmc]
    for fn in ("resnet", "pooled", "concat_all_gather", "number"):
        texts = {ast.get_source_segment(source(m.__name__), node) for m in training
                 for node in ast.parse(source(m.__name__)).body if getattr(node, "name", "") == fn}
        assert len(texts) == 1, fn


def simclr_nan(real):
    def nan_loss(z1, z2, tau):
        loss, logits, labels = real(z1, z2, tau)
        return loss * NAN, logits, labels
    return nan_loss


NAN_LOSSES = {  # the loss each script's loop checks, made NaN
    "moco": ("infonce_loss", lambda real: lambda logits, labels: F.cross_entropy(logits, labels) * NAN),
    "simclr": ("nt_xent_loss", simclr_nan),
    "byol": ("byol_loss", lambda real: lambda *out: real(*out) * NAN),
    "simsiam": ("simsiam_loss", lambda real: lambda p1, p2, z1, z2: (p1.sum() + p2.sum()) * NAN),
    "insdis": ("insdis_loss", lambda real: lambda *a, **k: tuple(t * NAN for t in real(*a, **k))),
    "cmc": ("cmc_loss", lambda real: lambda *a: tuple(t * NAN for t in real(*a))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAN_LOSSES)
def test_nan_loss_stops_and_keeps_the_last_checkpoint(name, tmp_path, monkeypatch):
    """On the smallest run (16 images of 8 px, 2 steps an epoch): where the loss turns NaN does not depend on size."""
    module = {m.__name__: m for m in (moco, simclr, byol, simsiam, insdis, cmc)}[name]
    module.main(ARGV[name] + ["--output-dir", str(tmp_path)])  # --epochs 1
    before = (tmp_path / "checkpoint.pth.tar").read_bytes()
    log_before = (tmp_path / "log.txt").read_text()
    loss, nan_loss = NAN_LOSSES[name]
    monkeypatch.setattr(module, loss, nan_loss(getattr(module, loss)))
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
    with pytest.raises(SystemExit) as err:
        module.main(ARGV[name] + ["--epochs", "2", "--output-dir", str(tmp_path), "--resume", "auto"])
    assert str(err.value) == f"{name}.py: loss is nan at epoch 1 step 0; stopped, the last checkpoint is as it was"
    assert handlers == [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]  # given back
    assert (tmp_path / "checkpoint.pth.tar").read_bytes() == before
    assert (tmp_path / "log.txt").read_text() == log_before


@pytest.mark.slow
def test_an_unreadable_image_in_a_loader_worker_is_one_line(tmp_path):
    """-j 2: the worker re-raises the error inside its own report; the command line still prints one line."""
    for c in ("a", "b"):
        (tmp_path / "bad" / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "bad" / c / f"{i}.jpg").write_bytes(b"not an image")
    proc = run_script("insdis.py", "--data", tmp_path / "bad", "-a", "resnet18", "-b", "4", "--nce-k", "2", "-j", "2",
                      "--image-size", "8", "--output-dir", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert last_line(proc.stderr).startswith(f"insdis.py: cannot read image '{tmp_path / 'bad'}"), proc.stderr
