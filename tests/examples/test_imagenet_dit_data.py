"""Latent preparation and shards of examples/imagenet_dit: ADM crop, VAE posterior, resume, clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from examples.imagenet_dit.dit_smoke import make_image_folder, make_tiny_vae
from examples.imagenet_dit.latent_data import EpochBatches, LatentDataError, LatentShards
from examples.imagenet_dit.prepare_latents import center_crop_adm, encode, prepare_latents, scan_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), num_classes=2, per_class=5)


def prep(images, out, vae, **kw):
    opts = dict(vae=vae, image_size=16, batch_size=4, shard_size=4, num_workers=0, dtype="float32", progress=False)
    opts.update(kw)
    return prepare_latents(images, out, **opts)


def test_adm_center_crop():
    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, :50] = 255  # left half white
    out = center_crop_adm(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, :7].min() > 200 and out[:, 9:].max() < 50  # the boundary stays in the middle
    big = center_crop_adm(Image.fromarray(np.full((300, 200, 3), 7, np.uint8)), 32)  # box-halving path
    assert big.shape == (32, 32, 3) and (big == 7).all()


@pytest.mark.slow
def test_prepare_writes_posterior_with_flips_and_labels(tmp_path, images, vae):
    m = prep(images, tmp_path / "lat", vae)
    assert m["num_images"] == 10 and m["num_shards"] == 3 and m["latent_shape"] == [4, 8, 8]
    assert m["classes"] == ["class_0", "class_1"] and m["scaling_factor"] == pytest.approx(0.18215)
    data = LatentShards(tmp_path / "lat")
    assert len(data) == 10
    mean, std, labels = data.gather(np.arange(10))
    assert mean.shape == (10, 2, 4, 8, 8) and (std > 0).all()
    assert labels.tolist() == [0] * 5 + [1] * 5
    _, samples = scan_image_folder(images)
    img = torch.from_numpy(center_crop_adm(Image.open(samples[7][0]), 16).copy())[None]
    ref_mean, ref_std = encode(vae, img, flips=True)
    np.testing.assert_allclose(mean[7], ref_mean[0], atol=1e-5)
    np.testing.assert_allclose(std[7], ref_std[0], atol=1e-5)
    flipped = torch.from_numpy(img.numpy()[:, :, ::-1].copy())
    np.testing.assert_allclose(mean[7, 1], encode(vae, flipped, flips=False)[0][0, 0], atol=1e-5)


def test_posterior_sampling_is_seeded_and_uses_mean_and_std(tmp_path, images, vae):
    prep(images, tmp_path / "lat", vae)
    data = LatentShards(tmp_path / "lat")
    idx = np.array([3, 0, 9, 3])
    g = torch.Generator().manual_seed(0)
    x1, y1 = data.sample_batch(idx, g, "cpu")
    g.manual_seed(0)
    x2, _ = data.sample_batch(idx, g, "cpu")
    assert torch.equal(x1, x2) and y1.tolist() == [0, 0, 1, 0]
    mean, std, _ = data.gather(idx)
    z = (x1.numpy() / data.scaling_factor - mean[:, 0]) / std[:, 0]
    z_flip = (x1.numpy() / data.scaling_factor - mean[:, 1]) / std[:, 1]
    # each row is a posterior sample of one of its two copies
    for i in range(4):
        assert min(np.abs(z[i]).max(), np.abs(z_flip[i]).max()) < 6


def test_prepare_resumes_after_interruption(tmp_path, images, vae):
    one_shot = tmp_path / "a"
    prep(images, one_shot, vae)
    out = tmp_path / "b"
    prep(images, out, vae, max_shards=1)  # "killed" after its first shard
    (out / "shard_00001.tmp-999").mkdir()  # and a half-written shard of the killed run
    with pytest.raises(LatentDataError, match=r"shard_00001.*missing or incomplete.*rerun prepare_latents"):
        LatentShards(out)
    prep(images, out, vae)
    assert not list(out.glob("*.tmp-*"))
    a, b = LatentShards(one_shot), LatentShards(out)
    for x, y in zip(a.gather(np.arange(10)), b.gather(np.arange(10)), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(RuntimeError, match=r"different settings.*shard_size"):
        prep(images, out, vae, shard_size=5)


def test_distributed_ranks_split_the_shards(tmp_path, images, vae):
    out = tmp_path / "lat"
    prep(images, out, vae, rank=1, world_size=2)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00001"]
    prep(images, out, vae, rank=0, world_size=2)
    assert len(LatentShards(out)) == 10


def test_missing_or_empty_dataset_path(tmp_path, vae):
    with pytest.raises(FileNotFoundError, match=r"dataset path .*nope.* does not exist"):
        prep(tmp_path / "nope", tmp_path / "lat", vae)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no images"):
        prep(tmp_path / "empty", tmp_path / "lat", vae)
    with pytest.raises(LatentDataError, match=r"does not exist; run prepare_latents.py"):
        LatentShards(tmp_path / "no_latents")


def test_empty_and_corrupt_shards_are_named(tmp_path, images, vae):
    good = tmp_path / "good"
    prep(images, good, vae)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    f = corrupt / "shard_00001" / "mean.npy"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.raises(LatentDataError, match=r"shard_00001.*corrupt"):
        LatentShards(corrupt)

    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    (garbage / "shard_00002" / "labels.npy").write_bytes(b"not a numpy file")
    with pytest.raises(LatentDataError, match=r"shard_00002.*corrupt"):
        LatentShards(garbage)

    empty = tmp_path / "empty"
    shutil.copytree(good, empty)
    d = empty / "shard_00000"
    for k in ("mean", "std"):
        np.save(d / f"{k}.npy", np.zeros((0, 2, 4, 8, 8), np.float32))
    np.save(d / "labels.npy", np.zeros((0,), np.int64))
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "count": 0}))
    with pytest.raises(LatentDataError, match=r"shard_00000.*empty"):
        LatentShards(empty)

    floats = tmp_path / "float_labels"
    shutil.copytree(good, floats)
    np.save(floats / "shard_00001" / "labels.npy", np.zeros(4, np.float32))
    with pytest.raises(LatentDataError, match=r"shard_00001.*labels.npy has dtype float32, expected kind 'iu'"):
        LatentShards(floats)


@pytest.fixture(scope="module")
def good_latents(tmp_path_factory, images, vae):
    """Shards of 4, 4 and 2 images (rows 0-3 of shard_00001 are dataset images 4-7)."""
    out = tmp_path_factory.mktemp("good") / "lat"
    prep(images, out, vae)
    return out


def corrupt_copy(good, tmp_path, shard, name, edit):
    """A copy of ``good`` with ``edit(array)`` applied to ``shard/name.npy``."""
    out = tmp_path / "lat"
    shutil.copytree(good, out)
    path = out / shard / f"{name}.npy"
    arr = np.load(path)
    edit(arr)
    np.save(path, arr)
    return out


@pytest.mark.parametrize(
    ("shard", "name", "row", "image", "value"),
    [
        ("shard_00001", "mean", 2, 6, np.nan),  # a middle row: neither the first nor the last of its shard
        ("shard_00001", "std", 1, 5, np.inf),
        ("shard_00000", "std", 0, 0, np.nan),
        ("shard_00002", "mean", 1, 9, -np.inf),  # the last row of the dataset
    ],
)
def test_non_finite_row_anywhere_names_shard_and_row(good_latents, tmp_path, shard, name, row, image, value):
    def put(arr):
        arr[row, 1, 2, 3, 4] = value  # one element of the flipped copy

    data = LatentShards(corrupt_copy(good_latents, tmp_path, shard, name, put))  # opening reads no latent rows
    others = [i for i in range(10) if i != image]
    mean, _, _ = data.gather(others)
    assert np.isfinite(mean).all()  # the other rows are served as before
    pattern = rf"{shard}.*{name}\.npy row {row} \(dataset image {image}\) holds non-finite values"
    with pytest.raises(LatentDataError, match=pattern):
        data.gather([others[0], image, others[1]])
    with pytest.raises(LatentDataError, match=pattern):  # what train.py calls
        data.sample_batch(np.array([image]), torch.Generator().manual_seed(0), "cpu")


@pytest.mark.parametrize("name", ["mean", "std", "labels"])
def test_truncated_file_names_shard_and_missing_rows(good_latents, tmp_path, name):
    out = tmp_path / "lat"
    shutil.copytree(good_latents, out)
    path = out / "shard_00001" / f"{name}.npy"
    with open(path, "rb") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        np.lib.format.read_array_header_1_0(f)
        header = f.tell()
    row = (path.stat().st_size - header) // 4  # 4 rows
    path.write_bytes(path.read_bytes()[: header + 2 * row + row // 2])  # two and a half rows left
    with pytest.raises(LatentDataError, match=rf"shard_00001.*{name}\.npy is truncated.*rows 2 to 3 are missing"):
        LatentShards(out)


@pytest.mark.parametrize(
    ("label", "extra"),
    [(-1, ""), (2, r" \(= num_classes: the null class of guidance\)"), (7, "")],
)
def test_labels_outside_the_classes_name_shard_and_row(good_latents, tmp_path, label, extra):
    def put(arr):
        arr[1] = label  # a middle row of shard_00001 (2 classes in the manifest)

    out = corrupt_copy(good_latents, tmp_path, "shard_00001", "labels", put)
    pattern = rf"shard_00001.*labels\.npy row 1 holds label {label}{extra}, outside \[0, 2\)"
    with pytest.raises(LatentDataError, match=pattern):
        LatentShards(out)


def test_epoch_batches_split_one_global_batch_between_ranks():
    b = EpochBatches(num_items=20, global_batch=8, seed=3)
    assert b.steps_per_epoch == 2
    for step in range(5):
        whole = b.indices(step)
        parts = np.concatenate([b.indices(step, r, 4) for r in range(4)])
        np.testing.assert_array_equal(whole, parts)
    epoch0 = np.concatenate([b.indices(0), b.indices(1)])
    assert len(set(epoch0.tolist())) == 16  # no repeats inside an epoch
    assert not np.array_equal(b.indices(0), b.indices(2))  # a new permutation each epoch
    with pytest.raises(LatentDataError, match=r"fewer than one global batch"):
        EpochBatches(num_items=4, global_batch=8, seed=0)
