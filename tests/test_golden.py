"""Golden outputs: what tiny runs of today's code write (checkpoint tensors, logs, configs,
PNG bytes, eval results), pinned in tests/data/golden/ so that moving code changes none of it.

Each output is reduced to a fingerprint: a tensor becomes its sha256, shape, dtype, float64
sum and float64 sum of absolute values; a PNG its sha256 and pixel sum; other values stay as
they are; clock readings are dropped, the test's temporary folder reads `<tmp>` and the
checkout `<repo>`.

By default hashes are skipped and numbers compared to a relative 1e-3; a tensor's sum and sum
of |x| to 1e-3 of the latter plus 1e-6 per element, since sums of small weights cancel. The
structure, keys, shapes and all non-numbers still have to match. Bit-for-bit equality is not a
property of a platform string: the same torch and CPU capability give other last bits with
another thread count (`OMP_NUM_THREADS=2` against the default on 2 cores) or where BLAS picks
kernels for another CPU model, and a few training steps spread those bits. For a refactor that
must not move a single bit, run on the machine that recorded the files, in the same
environment, with `DDPMKIT_GOLDEN_EXACT=1`: where the recorded platform (torch version, CPU
capability, architecture) matches, hashes and numbers must then be equal.

After an intended change of outputs, rewrite the files and say why in the commit:
`DDPMKIT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`.
"""

import hashlib
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, random_inception_weights, randomize_, same_tensors, tiny_config, write_fake_cifar
from PIL import Image

from ddpmkit.checkpoints.files import load_checkpoint, save_checkpoint
from ddpmkit.cli import main as ddpmkit_main
from ddpmkit.metrics import weights as wts
from ddpmkit.models.loading import build_from_config
from ddpmkit.runtime import devices

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden"
PLATFORM = (f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
            f"{' + AMX' if 'amx_tile' in devices.cpu_flags() else ''}, {platform.machine()}")
TRAINING_STATE = ("model", "ema", "optimizer", "scheduler", "rng", "step", "epoch")
REL_TOL = 1e-3
ELEMENT_TOL = 1e-6
LONG_LIST = 32


# ---- fingerprints ---------------------------------------------------------------------------
def fingerprint(value):
    """A JSON-able summary of (nested) values: tensors by hash, shape, dtype and sum."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().flatten()
        return {"sha256": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest(),
                "shape": list(value.shape), "dtype": str(value.dtype),
                "sum": float(t.double().sum()) if t.numel() else 0.0,
                "abs_sum": float(t.double().abs().sum()) if t.numel() else 0.0}
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if not is_clock_reading(k)}
    if isinstance(value, (list, tuple)):
        if len(value) > LONG_LIST and all(type(v) is int for v in value):  # an RNG's state
            return {"sha256": hashlib.sha256(repr(list(value)).encode()).hexdigest(),
                    "len": len(value)}
        return [fingerprint(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    return value


def is_clock_reading(key) -> bool:
    """Logged times and rates (`time`, `train_s`, `img_per_s`, ...); they differ run to run."""
    return key == "time" or str(key).endswith("_s")


def png_fingerprint(path: Path) -> dict:
    pixels = np.asarray(Image.open(path)).astype(np.int64)
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "shape": list(pixels.shape), "pixel_sum": int(pixels.sum())}


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _differences(actual, golden, exact: bool, where="$"):
    """Paths at which `actual` and `golden` differ (numbers to REL_TOL unless exact)."""
    if isinstance(golden, dict) and isinstance(actual, dict):
        if actual.keys() != golden.keys():
            yield f"{where}: keys {sorted(actual)} != {sorted(golden)}"
            return
        if not exact and "abs_sum" in golden:  # a tensor: its sums to a share of its size
            yield from _tensor_differences(actual, golden, where)
            golden, actual = ({k: v for k, v in d.items() if not k.endswith("sum")}
                              for d in (golden, actual))
        for k in golden:
            if exact or not k.endswith("sha256"):  # file bytes differ across torch versions
                yield from _differences(actual[k], golden[k], exact, f"{where}.{k}")
    elif isinstance(golden, list) and isinstance(actual, list):
        if len(actual) != len(golden):
            yield f"{where}: length {len(actual)} != {len(golden)}"
            return
        for i, (a, g) in enumerate(zip(actual, golden)):
            yield from _differences(a, g, exact, f"{where}[{i}]")
    elif (not exact and isinstance(golden, (int, float)) and isinstance(actual, (int, float))
          and not isinstance(golden, bool)):
        if not math.isclose(actual, golden, rel_tol=REL_TOL, abs_tol=1e-6):
            yield f"{where}: {actual!r} != {golden!r}"
    elif actual != golden:
        yield f"{where}: {actual!r} != {golden!r}"


def _tensor_differences(actual: dict, golden: dict, where: str):
    """A tensor's sum and sum of |x| to REL_TOL of the latter, plus ELEMENT_TOL per element:
    a bias in front of a normalization gets no gradient and is rounding noise only (|x| ~1e-9)."""
    tol = REL_TOL * max(golden["abs_sum"], actual["abs_sum"]) + ELEMENT_TOL * math.prod(
        golden["shape"])
    for key in ("sum", "abs_sum"):
        if abs(actual[key] - golden[key]) > tol:
            yield f"{where}.{key}: {actual[key]!r} != {golden[key]!r} (to {tol:.3g})"


def check_golden(name: str, actual, tmp_path: Path):
    """Compare `actual` (made JSON-able, tmp_path spelled `<tmp>`, the checkout `<repo>`) with
    golden file `name`."""
    text = json.dumps(fingerprint(actual), sort_keys=True).replace(str(tmp_path), "<tmp>")
    text = text.replace(str(REPO), "<repo>")
    actual = json.loads(text)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("DDPMKIT_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"platform": PLATFORM, "value": actual}, indent=1,
                                   sort_keys=True) + "\n")
        return
    golden = json.loads(path.read_text())
    exact = os.environ.get("DDPMKIT_GOLDEN_EXACT") == "1" and golden["platform"] == PLATFORM
    differences = list(_differences(actual, golden["value"], exact))
    assert not differences, f"{name} ({'exact' if exact else 'tolerant'}): " + "; ".join(
        differences[:8])


def training_state(state: dict) -> dict:
    return {k: state[k] for k in TRAINING_STATE}


# ---- resolved configs -----------------------------------------------------------------------
CONFIG_FILES = sorted([*(REPO / "ddpmkit" / "configs").glob("*.json"),
                       *(REPO / "tests" / "data" / "reference" / "configs").glob("*.json")])


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.parent.name}-{p.stem}")
def test_resolved_config(path, tmp_path):
    """What `train --config-path FILE` resolves (the dict every checkpoint stores), for every
    shipped config and the reference project's."""
    from ddpmkit.cli.train import build_parser, resolve_config, validate_config
    from ddpmkit.config import parse_with_explicit
    from ddpmkit.config.facts import complete_dataset_facts

    args, typed = parse_with_explicit(build_parser(), ["--config-path", str(path)])
    config = resolve_config(args, typed)
    validate_config(config)
    check_golden(f"config_{path.parent.parent.name}_{path.stem}",
                 complete_dataset_facts(config), tmp_path)


# ---- toy runs -------------------------------------------------------------------------------
def toy_argv(folder: Path, epochs: int, *extra):
    return ["train-toy", "--dataset", "gaussian8", "--size", "128", "--batch-size", "32",
            "--timesteps", "10", "--mid-features", "16", "--num-temporal-layers", "1",
            "--eval-intv", "10", "--num-eval-samples", "100", "--num-interim-samples", "50",
            "--chkpt-intv", "1", "--log-every", "1", "--ema-decay", "0.9", "--lr-warmup", "1",
            "--no-progress", "--animation-format", "none", "--image-dir", str(folder / "img"),
            "--chkpt-dir", str(folder / "ck"), "--epochs", str(epochs), *extra]


def test_toy_run_and_its_resume(tmp_path):
    assert ddpmkit_main(toy_argv(tmp_path / "a", 4)) == 0
    ck, img = tmp_path / "a" / "ck", tmp_path / "a" / "img" / "gaussian8"
    state = load_checkpoint(str(ck / "ddpm_gaussian8_4.pt"))
    check_golden("toy_run", {
        "checkpoint": state, "log": jsonl(ck / "ddpm_gaussian8_log.jsonl"),
        "config": json.loads((ck / "ddpm_gaussian8_config.json").read_text()),
        "metrics": json.loads((img / "metrics.json").read_text()),
        "files": sorted(os.listdir(ck)) + sorted(os.listdir(img))}, tmp_path)
    # stopped after 2 epochs and resumed: the same training state as the straight run
    assert ddpmkit_main(toy_argv(tmp_path / "b", 2)) == 0
    assert ddpmkit_main(toy_argv(tmp_path / "b", 4, "--resume")) == 0
    resumed = load_checkpoint(str(tmp_path / "b" / "ck" / "ddpm_gaussian8_4.pt"))
    same_tensors(training_state(resumed), training_state(state))


# ---- image runs -----------------------------------------------------------------------------
def image_argv(root: Path, tmp_path: Path, name: str, steps: int, *extra):
    # 40 images, batch 8, 2 micro-batches: 5 updates per epoch; a stop at 3 lands mid-epoch.
    # Dropout on, so a resumed run must restore the global RNG it draws from.
    return ["train", "--dataset", "cifar10", "--root", str(root), *TINY, "--batch-size", "8",
            "--num-accum", "2", "--use-ema", "--ema-decay", "0.9", "--drop-rate", "0.1",
            "--num-save-images", "0", "--precision", "fp32", "--max-steps", str(steps),
            "--chkpt-dir", str(tmp_path / "chkpts"), "--image-dir", str(tmp_path / "images"),
            "--exp-name", name, *extra]


def _newest(folder: Path) -> dict:
    (path,) = sorted(folder.glob("*.pt"))[-1:]
    return load_checkpoint(str(path))


def test_image_run_and_its_resume(tmp_path):
    root = write_fake_cifar(tmp_path / "data")
    assert ddpmkit_main(image_argv(root, tmp_path, "straight", 7)) == 0
    folder = tmp_path / "chkpts" / "straight"
    state = _newest(folder)
    assert state["step"] == 7
    check_golden("image_run", {
        "checkpoint": state, "log": jsonl(folder / "log.jsonl"),
        "config": json.loads((folder / "config.json").read_text()),
        "files": sorted(os.listdir(folder))}, tmp_path)
    assert ddpmkit_main(image_argv(root, tmp_path, "split", 3)) == 0
    assert ddpmkit_main(image_argv(root, tmp_path, "split", 7, "--resume")) == 0
    resumed = _newest(tmp_path / "chkpts" / "split")
    same_tensors(training_state(resumed), training_state(state))


# ---- generation -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny UNet checkpoints with random O(1) weights: unconditional and 3 classes."""
    folder = tmp_path_factory.mktemp("golden_checkpoints")
    paths = {}
    for num_classes in (0, 3):
        config = tiny_config()
        if num_classes:
            config["model"]["num_classes"] = num_classes
            config["dataset"]["class_names"] = ["a", "b", "c"]
        torch.manual_seed(0)
        model, _ = build_from_config(config)
        randomize_(model, seed=1)
        paths[num_classes] = folder / f"tiny_{num_classes}.pt"
        save_checkpoint({"model": model.state_dict(), "config": config, "step": 1, "epoch": 1},
                        str(paths[num_classes]))
    return paths


SAMPLERS = {"ddpm": [], "ddim": ["--steps", "4", "--eta", "0.5"],
            "dpm-solver++": ["--steps", "4"]}


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_generated_pngs(checkpoints, tmp_path, sampler, guided):
    guidance = ["--guidance-scale", "2"] if guided else []
    argv = ["generate", "--chkpt-path", str(checkpoints[3 if guided else 0]), "--total-size",
            "3", "--batch-size", "2", "--sampler", sampler, *SAMPLERS[sampler], *guidance,
            "--precision", "fp32", "--device", "cpu", "--seed", "7", "--max-workers", "0",
            "--save-dir", str(tmp_path), "--no-progress"]
    assert ddpmkit_main(argv) == 0
    folder = tmp_path / "cifar10"
    files = sorted(os.listdir(folder))
    record = {"files": files,
              "pngs": {n: png_fingerprint(folder / n) for n in files if n.endswith(".png")},
              "manifest": json.loads((folder / "generation.json").read_text())}
    if guided:
        record["labels"] = (folder / "labels.csv").read_text()
    check_golden(f"generate_{sampler}_{'guided' if guided else 'plain'}", record, tmp_path)


# ---- animations -----------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_animation_bytes(tmp_path, ext):
    """`generate --animate` frames (exact pixels) and `train-toy`'s plot animation (small)."""
    from ddpmkit.utils.images import PLOT_FRAMES, save_animation

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (8, 14, 3), dtype=np.uint8) for _ in range(3)]
    plots = [Image.fromarray(rng.integers(0, 256, (300, 600, 3), dtype=np.uint8))
             for _ in range(3)]
    save_animation(str(tmp_path / f"samples.{ext}"), frames)
    save_animation(str(tmp_path / f"plots.{ext}"), plots, PLOT_FRAMES)
    record = {}
    for name in ("samples", "plots"):
        path = tmp_path / f"{name}.{ext}"
        with Image.open(path) as im:
            durations = []
            for i in range(im.n_frames):
                im.seek(i)
                durations.append(im.info.get("duration"))
            record[name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "size": list(im.size), "durations": durations}
    check_golden(f"animation_{ext}", record, tmp_path)


# ---- evaluation -----------------------------------------------------------------------------
def test_eval_json_on_a_fixed_folder(tmp_path, monkeypatch):
    path, spec = random_inception_weights(tmp_path, seed=3)
    monkeypatch.setattr(wts, "INCEPTION_WEIGHTS", spec)
    for folder, seed in ((tmp_path / "eval" / "samples", 0), (tmp_path / "real", 1)):
        folder.mkdir(parents=True)
        arrays = np.random.default_rng(seed).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
        for i, array in enumerate(arrays):
            Image.fromarray(array).save(folder / f"{i:03d}.png")
    argv = ["eval", "--eval-dir", str(tmp_path / "eval"), "--folder-name", "samples",
            "--ref-folder", str(tmp_path / "real"), "--metrics", "fid", "pr", "kid", "is",
            "--nhood-size", "2", "--kid-subsets", "2", "--kid-subset-size", "4",
            "--is-splits", "2", "--inception-weights", path, "--device", "cpu",
            "--num-workers", "0", "--eval-batch-size", "4"]
    assert ddpmkit_main(argv) == 0
    (record,) = jsonl(tmp_path / "eval" / "metrics.jsonl")
    record["extractor"] = record["extractor"].replace(spec.sha256, "<random weights' sha256>")
    check_golden("eval", record, tmp_path)


def test_the_comparison_is_exact_on_request_and_tolerant_by_default():
    golden = {"w": {"sha256": "ab", "sum": 1.0, "abs_sum": 2.0, "shape": [2]}, "step": 3,
              "name": "x"}
    nearby = {"w": {"sha256": "cd", "sum": 1.0 + 1e-5, "abs_sum": 2.0, "shape": [2]},
              "step": 3, "name": "x"}
    assert len(list(_differences(nearby, golden, exact=True))) == 2
    assert not list(_differences(nearby, golden, exact=False))
    for changed in ({**nearby, "name": "y"}, {**nearby, "step": 4},
                    {**nearby, "w": {**nearby["w"], "shape": [3]}}, {"w": nearby["w"]},
                    {**nearby, "w": {**nearby["w"], "sum": 1.01}},
                    {**nearby, "w": {**nearby["w"], "abs_sum": 2.01}}):
        assert list(_differences(changed, golden, exact=False)), changed


def test_a_sum_that_cancels_is_compared_to_the_size_of_its_terms():
    """Sums of small weights (a bias near zero) move by more than 1e-3 of themselves when the
    kernels round differently; against the sum of |x| that is a small change."""
    golden = {"sum": -3.0e-8, "abs_sum": 2.0e-3, "sha256": "ab", "shape": [1]}
    assert not list(_differences({**golden, "sum": 1.2e-6}, golden, exact=False))
    assert list(_differences({**golden, "sum": 1.0e-5}, golden, exact=False))
    noise = {"sum": 1.2e-8, "abs_sum": 4.1e-8, "sha256": "ab", "shape": [32]}
    assert not list(_differences({**noise, "sum": -5.0e-9, "abs_sum": 6e-8}, noise, exact=False))
    assert list(_differences({**noise, "sum": 1e-4}, noise, exact=False))
