"""common.py: meters, augmentation ops, the synthetic dataset, --data and the loader."""
import random

import pytest
import torch
import torchvision.transforms as transforms
from PIL import Image

import common


def test_average_meter_keeps_tensors_on_device_until_read():
    meter = common.AverageMeter("Loss", ":.2f")
    meter.update(torch.tensor(2.0), n=2)
    meter.update(torch.tensor(5.0), n=1)
    assert torch.is_tensor(meter.sum)  # no host copy while training
    assert meter.avg == pytest.approx(3.0) and str(meter) == "Loss 5.00 (3.00)"


def test_progress_line_ends_with_the_time_left_in_the_epoch_and_the_run(capsys):
    step, loss = common.AverageMeter("Time", ":.1f"), common.AverageMeter("Loss", ":.2f")
    step.update(2.0), step.update(4.0)  # 3 s a step on average
    loss.update(torch.tensor(0.5))
    common.ProgressMeter(10, [step, loss], "Epoch: [1]", steps_after=20).display(3)
    common.ProgressMeter(10, [step, loss], "Epoch: [1]").display(9)
    first, second = capsys.readouterr().out.splitlines()
    # steps 4..9 are left in the epoch (6 × 3 s), 20 more after it ((6 + 20) × 3 s = 78 s)
    assert first == "Epoch: [1][ 3/10]\tTime 4.0 (3.0)\tLoss 0.50 (0.50)\tETA 0:00:18 (run 0:01:18)"
    assert second == "Epoch: [1][ 9/10]\tTime 4.0 (3.0)\tLoss 0.50 (0.50)"  # no steps_after: no ETA


def test_accuracy_top_k_by_hand():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.5, 0.1, 0.4]])
    target = torch.tensor([1, 1, 0, 2])  # top-1 right: row 0; top-2 right: rows 0, 1, 3
    top1, top2 = common.accuracy(output, target, topk=(1, 2))
    assert float(top1) == pytest.approx(25.0) and float(top2) == pytest.approx(75.0)


def test_multi_view_gives_independent_augmentations():
    t = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.ToTensor()])
    img = Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy())
    views = common.MultiView([t, t])(img)
    assert len(views) == 2 and views[0].shape == (3, 16, 16)
    assert not torch.equal(views[0], views[1])


def test_gaussian_blur_draws_sigma_per_image():
    img = Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy())
    weak, strong = common.GaussianBlur((0.1, 0.1))(img), common.GaussianBlur((3.0, 3.0))(img)
    to_tensor = transforms.ToTensor()
    assert to_tensor(strong).std() < to_tensor(weak).std() < to_tensor(img).std() + 1e-6
    # σ is relative to a 224 px image: σ=2 on 224 px equals σ=2·32/224 on 32 px
    from PIL import ImageFilter
    by_hand = img.filter(ImageFilter.GaussianBlur(radius=2.0 * 32 / 224))
    assert torch.equal(to_tensor(common.GaussianBlur((2.0, 2.0))(img)), to_tensor(by_hand))


# ----------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("cls", [common.SyntheticTextures, common.SyntheticShapes])
def test_synthetic_is_generated_from_a_seed_labelled_and_split(cls):
    a, b = cls(200), cls(200)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert a.images.shape == (200, 32, 32, 3) and a.images.dtype == torch.uint8
    assert torch.bincount(a.targets).tolist() == [200 // cls.num_classes] * cls.num_classes
    assert len(a.classes) == cls.num_classes
    val = cls(200, split="val")
    assert not torch.equal(val.images, a.images)
    img, target = a[0]
    assert isinstance(img, Image.Image) and target == int(a.targets[0])


@pytest.mark.parametrize("cls", [common.SyntheticTextures, common.SyntheticShapes])
def test_synthetic_class_is_not_predicted_by_colour(cls):
    """The nuisance (mean colour of an image) carries next to no class information: the best
    per-class mean-colour classifier is far below what the textures or the shapes allow."""
    d = cls(2000)
    colour = d.images.float().mean((1, 2))  # N×3
    centroids = torch.stack([colour[d.targets == c].mean(0) for c in range(cls.num_classes)])
    val = cls(1000, split="val")
    val_colour = val.images.float().mean((1, 2))
    pred = torch.cdist(val_colour, centroids).argmin(1)
    assert (pred == val.targets).float().mean() < 2.5 / cls.num_classes  # chance is 1 / num_classes


def test_synthetic_nuisances_are_only_those_the_augmentations_undo():
    """No instance ID that no augmentation removes (see the SyntheticTextures docstring): no rotation
    or illumination gradient (each row of a horizontal-stripe image is one grey level plus noise),
    no per-image colour tint (R − B averages to 0), and the colour follows the pattern."""
    d = common.SyntheticTextures(200)
    x = d.images.float()  # N×H×W×3, 0–255
    grey = x.mean(-1)
    stripes = grey[d.targets == 0]
    assert stripes.std(2).mean() < 12  # pixel noise alone: 0.04 × 255 ≈ 10; a ±12° rotation gave ≈ 50
    red_minus_blue = x[..., 0] - x[..., 2]
    assert red_minus_blue.mean((1, 2)).abs().max() < 3  # a tint of ±0.15 would give up to ±75
    for g, rb in zip(grey, red_minus_blue):  # warm where light: a/b carries the texture (CMC)
        assert torch.corrcoef(torch.stack([g.flatten(), rb.flatten()]))[0, 1] > 0.6


def test_shapes_draw_a_colour_per_image():
    """`shapes` gives each image colours of any hue (docs/synthetic.md): its images' mean R − B spreads widely, where
    the textures' stays within 3/255 of zero; the grey design of before gave 0.047."""
    x = common.SyntheticShapes(400).images.float() / 255
    assert (x[..., 0] - x[..., 2]).mean((1, 2)).std() > 0.08  # measured: 0.11


def test_build_dataset_synthetic_sizes_and_index():
    train = common.build_dataset("synthetic:100", "train", None, return_index=True)
    val = common.build_dataset("synthetic:100", "val", None)
    assert len(train) == 100 and len(val) == 20
    img, target, index = train[7]
    assert index == 7 and target == int(train.dataset.targets[7])


def test_build_dataset_image_folder_layouts_and_errors(tmp_path):
    with pytest.raises(common.DataError, match="does not exist"):
        common.build_dataset(str(tmp_path / "missing"), "train", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DataError, match="holds no images"):
        common.build_dataset(str(tmp_path / "empty"), "train", None)
    for split in ("train", "val"):
        (tmp_path / "split" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "split" / split / "cat" / "0.png")
    assert len(common.build_dataset(str(tmp_path / "split"), "val", None)) == 1
    (tmp_path / "flat" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "dog" / "0.png")
    assert len(common.build_dataset(str(tmp_path / "flat"), "pretrain", None)) == 1
    with pytest.raises(common.DataError, match="has no val/ folder"):
        common.build_dataset(str(tmp_path / "flat"), "val", None)


def test_unreadable_image_is_a_data_error_whose_text_is_one_line(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(common.DataError) as err:
        common.load_image(str(tmp_path / "bad.jpg"))
    assert str(err.value).startswith(f"cannot read image '{tmp_path / 'bad.jpg'}': ") and "\n" not in str(err.value)
    wrapped = common.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback:\n"
                               "  File ...\ncommon.DataError: cannot read image 'x.jpg': broken\n")
    assert str(wrapped) == "cannot read image 'x.jpg': broken"  # what the scripts print


@pytest.mark.slow  # a loader worker process
def test_a_data_error_re_raised_by_a_loader_worker_prints_as_its_one_line(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"garbage")
    loader = common.build_loader(common.build_dataset(str(tmp_path), "train", None), 1, 1, 0, 1, train=False)
    loader.collate_fn = lambda batch: batch  # PIL images as they are
    with pytest.raises(common.DataError) as err:
        next(iter(loader))
    assert "Original Traceback" in err.value.args[0]  # torch's wrapping, with the worker's traceback
    assert str(err.value).startswith(f"cannot read image '{tmp_path / 'cat' / 'bad.jpg'}': cannot identify image")
    assert "\n" not in str(err.value)


def test_loader_shards_disjointly_and_reshuffles_per_epoch():
    dataset = common.build_dataset("synthetic:100", "train", transforms.ToTensor(), return_index=True)
    shards = [common.build_loader(dataset, 10, 0, rank, 2, train=True, seed=0) for rank in (0, 1)]
    seen = [torch.cat([index for _, _, index in loader]) for loader in shards]
    assert len(seen[0]) == len(seen[1]) == 50 and not set(seen[0].tolist()) & set(seen[1].tolist())
    shards[0].sampler.set_epoch(1)
    assert not torch.equal(torch.cat([index for _, _, index in shards[0]]), seen[0])
    with pytest.raises(common.DataError, match=r"^the data has 100 images, fewer than the global batch 104$"):
        common.build_loader(dataset, 52, 0, 0, 2, train=True)  # a training loader needs one whole global batch
    assert len(common.build_loader(dataset, 52, 0, 0, 2, train=False)) == 1  # evaluation: every image, no drop


def _views_loader(workers: int, seed=3):
    t = transforms.Compose([transforms.RandomResizedCrop(16), transforms.ColorJitter(0.4, 0.4, 0.4, 0.1),
                            common.GaussianBlur(), transforms.ToTensor()])  # torch's RNG and `random`
    dataset = common.build_dataset("synthetic:48", "pretrain", common.MultiView([t, t]))
    return common.build_loader(dataset, 8, workers, 0, 1, train=True, seed=seed)


def test_training_views_are_a_function_of_seed_epoch_and_index_only():
    loader = _views_loader(workers=0)
    seeded = loader.dataset
    before = torch.get_rng_state()
    first = seeded[5][0]
    assert torch.equal(torch.get_rng_state(), before)  # the training process's stream is not drawn from
    torch.rand(7), random.random()  # whatever else happens in between
    assert all(torch.equal(a, b) for a, b in zip(first, seeded[5][0]))
    assert not torch.equal(first[0], first[1])  # the two views still differ
    loader.sampler.set_epoch(1)
    assert not torch.equal(first[0], seeded[5][0][0])  # a new epoch, new views
    assert not torch.equal(first[0], _views_loader(workers=0, seed=4).dataset[5][0][0])


@pytest.mark.slow
def test_two_workers_load_the_same_batches_as_the_main_process():
    batches = []
    for workers in (0, 2):
        loader = _views_loader(workers)
        loader.sampler.set_epoch(1)
        torch.manual_seed(0)  # the loader's one draw, its worker base seed, comes from the training stream
        batches.append([views for views, _ in loader])
    for (a1, a2), (b1, b2) in zip(*batches):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_resumable_sampler_skips_its_first_start_indices():
    sampler = common.ResumableSampler(range(50), num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.start = 10  # a run resumed after 2 steps of 5 images on this rank (Run.steps sets it every epoch)
    assert list(sampler) == whole[10:] and len(sampler) == len(whole) == 25  # len(): the whole epoch
    sampler.set_epoch(5)
    assert list(sampler) != whole[10:] and len(list(sampler)) == 15  # another order, the same skip
    sampler.start = 0
    assert len(list(sampler)) == 25  # the next epoch from its beginning
