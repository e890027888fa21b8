"""Image datasets: each loader on a small dataset written by the test in the real on-disk layout,
the real data in shared/data, missing and empty folders, and the DataLoader settings."""

import dataclasses
import gzip
import json
import pickle
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from ddpmkit.data import build_dataset, build_loader, dataset_info
from ddpmkit.data.images import DATASETS, read_idx
from ddpmkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CONFIG_DIR = ROOT / "ddpmkit" / "configs"

# The reference's transforms, written with torchvision as the reference wrote them.
TO_UNIT = [transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]
MNIST_REFERENCE = transforms.Compose([transforms.Resize((32, 32))] + TO_UNIT)
CELEBA_REFERENCE = transforms.Compose(
    [lambda im: TF.crop(im, top=40, left=15, height=148, width=148),
     transforms.Resize((64, 64))] + TO_UNIT)


def to_uint8(image):
    """[-1, 1] float image back to its uint8 pixels (exact for our x / 127.5 - 1)."""
    return torch.round((image + 1) * 127.5).to(torch.uint8)


def random_uint8(rng, *shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# ---- MNIST (IDX) -----------------------------------------------------------------------------

def write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(folder, prefix, images, labels, gz):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_in_torchvision_layout(tmp_path, gz):
    rng = np.random.default_rng(0)
    images, labels = random_uint8(rng, 5, 28, 28), np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_mnist(tmp_path / "MNIST" / "raw", "train", images, labels, gz)
    ds = build_dataset("mnist", tmp_path, split="train")
    assert len(ds) == 5
    for i in range(5):
        image, label = ds[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert label == labels[i]
        # Same pixels as the reference's Resize((32, 32)) + ToTensor + Normalize(0.5, 0.5).
        expected = MNIST_REFERENCE(Image.fromarray(images[i]))
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_idx_reader_round_trips_other_dtypes_and_rejects_bad_files(tmp_path):
    array = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "a.idx", array)
    assert np.array_equal(read_idx(str(tmp_path / "a.idx")), array)
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad.idx"))
    (tmp_path / "short.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        read_idx(str(tmp_path / "short.idx"))


def test_mnist_only_test_split_present(tmp_path):
    rng = np.random.default_rng(1)
    write_mnist(tmp_path / "mnist", "t10k", random_uint8(rng, 3, 28, 28),
                np.array([7, 2, 1], dtype=np.uint8), gz=True)
    assert [label for _, label in build_dataset("mnist", tmp_path, split="test")] == [7, 2, 1]
    with pytest.raises(UserError, match="use split 'test'"):
        build_dataset("mnist", tmp_path, split="train")


def test_real_mnist_test_split():
    if not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST test files are not in {SHARED_DATA / 'mnist'}")
    ds = build_dataset("mnist", SHARED_DATA, split="test")
    assert len(ds) == 10_000
    # The first labels of the official MNIST test set.
    assert [ds[i][1] for i in range(10)] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    image = ds[0][0]
    assert image.shape == (1, 32, 32)
    assert image.min() == -1.0 and 0.9 < image.max() <= 1.0
    raw = read_idx(str(SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz"))
    torch.testing.assert_close(image, MNIST_REFERENCE(Image.fromarray(raw[0])),
                               rtol=0, atol=1e-6)


# ---- CIFAR-10 (pickled batches) --------------------------------------------------------------

def cifar_pickle(images, labels):
    """A batch as the original files hold it: a Python-2 protocol-2 pickle whose numpy globals
    are recorded under `numpy.core` (numpy 2 writes `numpy._core`)."""
    entry = {b"batch_label": b"fake", b"labels": [int(v) for v in labels],
             b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(images)}
    return pickle.dumps(entry, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")


def write_cifar(folder, images, labels, per_batch):
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        (folder / name).write_bytes(cifar_pickle(images[sl], labels[sl]))


def cifar_images(n):
    """(N, 3, 32, 32) uint8 and labels: the real first training images when available."""
    npz = SHARED_DATA / "cifar10" / "cifar10-train-first200.npz"
    if npz.is_file():
        with np.load(npz) as data:
            return data["images"][:n].transpose(0, 3, 1, 2).copy(), data["labels"][:n]
    rng = np.random.default_rng(2)
    return random_uint8(rng, n, 3, 32, 32), rng.integers(0, 10, n)


def test_cifar10_pickled_batches(tmp_path):
    images, labels = cifar_images(18)
    write_cifar(tmp_path / "cifar-10-batches-py", images, labels, per_batch=3)
    train = build_dataset("cifar10", tmp_path, split="train", random_flip=False)
    test = build_dataset("cifar10", tmp_path, split="test", random_flip=False)
    assert len(train) == 15 and len(test) == 3
    for i in range(15):
        image, label = train[i]
        assert image.shape == (3, 32, 32) and label == labels[i]
        assert torch.equal(to_uint8(image), torch.from_numpy(images[i]))
        assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(to_uint8(test[2][0]), torch.from_numpy(images[17]))


def test_cifar10_flips_half_the_time_and_follows_the_seed(tmp_path):
    images, labels = cifar_images(6)
    write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", images, labels, per_batch=1)
    ds = build_dataset("cifar10", tmp_path)  # flips by default; an alternative folder name
    original = torch.from_numpy(images[0])
    torch.manual_seed(0)
    draws = [to_uint8(ds[0][0]) for _ in range(40)]
    flipped = sum(torch.equal(d, original.flip(-1)) for d in draws)
    assert sum(torch.equal(d, original) for d in draws) + flipped == 40
    assert 8 <= flipped <= 32
    torch.manual_seed(0)
    assert all(torch.equal(to_uint8(ds[0][0]), d) for d in draws)


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    images, labels = cifar_images(6)
    write_cifar(tmp_path / "cifar-10-batches-py", images, labels, per_batch=1)

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="not allowed"):
        build_dataset("cifar10", tmp_path, split="test")


# ---- CelebA ----------------------------------------------------------------------------------

def test_celeba_folder_partition_and_reference_crop(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    partitions = [0, 0, 0, 1, 2, 2]
    lines = []
    for i, part in enumerate(partitions, 1):
        name = f"{i:06d}.jpg"
        Image.fromarray(random_uint8(rng, 218, 178, 3)).save(folder / "img_align_celeba" / name)
        lines.append(f"{name} {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")

    sizes = {s: len(build_dataset("celeba", tmp_path, split=s))
             for s in ("train", "valid", "test", "all")}
    assert sizes == {"train": 3, "valid": 1, "test": 2, "all": 6}
    ds = build_dataset("celeba", tmp_path, split="test", random_flip=False)
    image, label = ds[1]
    assert image.shape == (3, 64, 64) and label == 0
    with Image.open(folder / "img_align_celeba" / "000006.jpg") as im:
        expected = CELEBA_REFERENCE(im.convert("RGB"))
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_celeba_unreadable_image_is_a_user_error(tmp_path):
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "img_align_celeba" / "000001.jpg").write_bytes(b"not a jpeg")
    (folder / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n")
    ds = build_dataset("celeba", tmp_path)
    with pytest.raises(UserError, match="000001.jpg"):
        ds[0]
    with pytest.raises(UserError, match="000002.jpg"):
        ds[1]


# ---- CelebA-HQ and folders -------------------------------------------------------------------

def test_celebahq_pngs_in_numeric_order(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "celeba_hq" / "img_celeba_hq"
    folder.mkdir(parents=True)
    pixels = {}
    for name in ("10", "2", "1"):
        pixels[name] = random_uint8(rng, 256, 256, 3)
        Image.fromarray(pixels[name]).save(folder / f"{name}.png")
    ds = build_dataset("celebahq", tmp_path, random_flip=False)
    assert len(ds) == 3
    for i, name in enumerate(["1", "2", "10"]):
        image, _ = ds[i]
        assert image.shape == (3, 256, 256)
        assert torch.equal(to_uint8(image), torch.from_numpy(pixels[name]).permute(2, 0, 1))


def make_tree(root):
    """Nested images of assorted formats, modes and sizes, plus files that are not images."""
    rng = np.random.default_rng(5)
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / ".hidden").mkdir()
    Image.fromarray(random_uint8(rng, 30, 40, 4), "RGBA").save(root / "a" / "x.png")
    Image.fromarray(random_uint8(rng, 20, 20, 3)).save(root / "a" / "b" / "y.JPG", "JPEG")
    Image.fromarray(random_uint8(rng, 50, 16)).save(root / "c" / "z.webp")
    Image.fromarray(random_uint8(rng, 16, 16, 3)).save(root / "top.bmp")
    Image.fromarray(random_uint8(rng, 16, 16, 3)).save(root / ".hidden" / "skip.png")
    (root / "c" / "notes.txt").write_text("not an image")


def test_folder_dataset_finds_nested_images(tmp_path):
    make_tree(tmp_path)
    ds = build_dataset("folder", tmp_path, image_size=16)
    assert len(ds) == 4
    assert sorted(map(str, ds.files)) == ["a/b/y.JPG", "a/x.png", "c/z.webp", "top.bmp"]
    labels = {str(f): ds[i][1] for i, f in enumerate(ds.files)}
    assert len(set(labels.values())) == 4  # one label per parent folder
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1
    assert dataset_info("folder", 16) == (3, 16)


def test_folder_center_crop(tmp_path):
    # 30x10: red left and right thirds, green centre square -> only green survives.
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 20:, 0] = 255
    pixels[:, 10:20, 1] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image, _ = build_dataset("folder", tmp_path, image_size=5)[0]
    assert torch.equal(to_uint8(image)[:, 0, 0], torch.tensor([0, 255, 0], dtype=torch.uint8))
    assert torch.equal(to_uint8(image).amax(dim=(1, 2)), torch.tensor([0, 255, 0],
                                                                       dtype=torch.uint8))


def test_folder_flip_is_a_flag(tmp_path):
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[:, 0] = (255, 0, 0)  # asymmetric, and in color (three channels)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    plain = build_dataset("folder", tmp_path, image_size=4)
    assert all(torch.equal(plain[0][0], plain[0][0].new_tensor(pixels).permute(2, 0, 1)
                           / 127.5 - 1) for _ in range(10))
    flipping = build_dataset("folder", tmp_path, image_size=4, random_flip=True)
    torch.manual_seed(0)
    assert len({to_uint8(flipping[0][0])[0, 0, 0].item() for _ in range(20)}) == 2


@pytest.fixture(scope="module")
def cifar10_jpg_folder(tmp_path_factory):
    tarball = SHARED_DATA / "cifar10" / "cifar10-test-jpg.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} is not available")
    folder = tmp_path_factory.mktemp("cifar10_jpg")
    with tarfile.open(tarball) as tar:
        # The "data" filter refuses links and absolute paths (where this Python has it).
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(folder, **kwargs)
    return folder


def test_real_cifar10_jpegs_as_a_folder(cifar10_jpg_folder):
    ds = build_dataset("folder", cifar10_jpg_folder, image_size=32)
    assert len(ds) == 10_000
    counts = Counter(int(v) for v in ds.labels)
    assert len(counts) == 10 and set(counts.values()) == {1000}
    image, _ = ds[1234]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    with Image.open(Path(cifar10_jpg_folder) / str(ds.files[1234])) as im:
        assert im.size == (32, 32)  # no resize happened: pixels are the JPEG's
        assert torch.equal(to_uint8(image), torch.from_numpy(np.array(im.convert("RGB")))
                           .permute(2, 0, 1))


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("mnist", "MNIST/raw"),
    ("cifar10", "cifar-10-batches-py"),
    ("celeba", "list_eval_partition.txt"),
    ("celebahq", "img_celeba_hq"),
])
def test_missing_dataset_names_path_and_layout(tmp_path, name, expected):
    with pytest.raises(UserError) as info:
        build_dataset(name, tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and expected in message
    assert ("--download" in message) == (name != "celebahq")


def test_missing_and_empty_image_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_dataset("folder", tmp_path / "nowhere", image_size=32)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images found under"):
        build_dataset("folder", tmp_path / "empty", image_size=32)
    with pytest.raises(UserError, match="--image-size"):
        build_dataset("folder", tmp_path / "empty")


def test_bad_name_and_split(tmp_path):
    with pytest.raises(UserError, match="cifar10"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(UserError, match="train, test"):
        build_dataset("cifar10", tmp_path, split="valid")


def test_download_goes_through_the_dataset_downloader(tmp_path, monkeypatch):
    images, labels = cifar_images(6)
    calls = []

    def fake_download(root, split):  # what torchvision's CIFAR10(download=True) leaves behind
        calls.append((root, split))
        write_cifar(Path(root) / "cifar-10-batches-py", images, labels, per_batch=1)

    def failing_download(root, split):
        raise RuntimeError("network unreachable")

    spec = DATASETS["cifar10"]
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, download=failing_download))
    with pytest.raises(UserError, match="network unreachable.*cifar-10-batches-py"):
        build_dataset("cifar10", tmp_path, download=True)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, download=fake_download))
    with pytest.raises(UserError):  # no download unless asked
        build_dataset("cifar10", tmp_path)
    assert len(build_dataset("cifar10", tmp_path, split="test", download=True)) == 1
    assert calls == [(str(tmp_path), "test")]
    build_dataset("cifar10", tmp_path, split="test", download=True)
    assert len(calls) == 1  # present now: no second download


def test_celebahq_download_request_explains_there_is_none(tmp_path):
    with pytest.raises(UserError, match="no automatic download"):
        build_dataset("celebahq", tmp_path, download=True)


# ---- info and loaders ------------------------------------------------------------------------

def test_dataset_info_matches_the_shipped_configs():
    assert dataset_info("mnist") == (1, 32)
    assert dataset_info("celebahq") == (3, 256)
    for name in ("mnist", "cifar10", "celeba", "celebahq"):
        cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        info = dataset_info(cfg["dataset"]["name"])
        assert info == (cfg["dataset"]["channels"], cfg["dataset"]["resolution"])
        assert cfg["model"]["in_channels"] == info[0]
        assert cfg["dataset"]["random_flip"] == DATASETS[name].random_flip


def test_loader_batches_and_settings(tmp_path):
    images, labels = cifar_images(12)
    write_cifar(tmp_path / "cifar-10-batches-py", images, labels, per_batch=2)
    ds = build_dataset("cifar10", tmp_path)
    loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=0, device="cpu",
                          drop_last=True, generator=torch.Generator().manual_seed(0))
    assert not loader.pin_memory
    batches = list(loader)
    assert len(batches) == 2  # 10 training images, drop_last
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64

    def first_batch(seed):
        loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=1, device="cpu",
                              drop_last=True, generator=torch.Generator().manual_seed(seed))
        assert loader.persistent_workers and loader.num_workers == 1
        return next(iter(loader))

    a, b = first_batch(1), first_batch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # order and flips are seeded

    with pytest.raises(ValueError, match="sampler"):
        build_loader(ds, 4, shuffle=True, num_workers=0, device="cpu", drop_last=False,
                     sampler=torch.utils.data.SequentialSampler(ds))
