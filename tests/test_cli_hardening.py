"""Every mistake a one-line error, no run ever damaged: the config schema, run-folder safety,
clean failures of workers and paths, fast --help with defaults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, one_line_error, run_args, write_fake_cifar

from ddpmkit.cli import main as ddpmkit_main
from ddpmkit.cli.train import FLAG_TO_CONFIG
from ddpmkit.cli.train import main as train_main
from ddpmkit.config import schema
from ddpmkit.config.table import markdown_table

ROOT = Path(__file__).resolve().parents[1]
# Tiny models: intra-op threads would only fight over the shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"))


def base(cifar_root, tmp_path, *extra):
    return ["--dataset", "cifar10", "--root", str(cifar_root), *TINY, "--batch-size", "4",
            "--num-save-images", "0", *run_args(tmp_path), *extra]


def snapshot(folder: Path):
    """Every file under `folder` with its bytes (None if the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---- the config schema ----------------------------------------------------------------------
def _config_file(tmp_path, **sections):
    cfg = json.loads((ROOT / "configs" / "cifar10.json").read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "my.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("sections, needles", [
    ({"train": {"learning_rate": 1e-4}}, ["unknown key train.learning_rate", "did you mean 'lr'"]),
    ({"diffusion": {"timestep": 10}}, ["diffusion.timestep", "did you mean 'timesteps'"]),
    ({"train": {"timesteps": 10}}, ["did you mean 'diffusion.timesteps'"]),
    ({"train": {"lr": "fast"}}, ["train.lr must be a number, got 'fast'"]),
    ({"train": {"batch_size": 4.5}}, ["train.batch_size must be an integer, got 4.5"]),
    ({"train": {"use_ema": "yes"}}, ["train.use_ema must be true or false"]),
    ({"diffusion": {"beta_schedule": "cosin"}}, ["did you mean 'cosine'"]),
    ({"model": {"drop_rate": 1.5}}, ["model.drop_rate must be < 1"]),
    ({"timestep": {}}, ["unknown section 'timestep'"]),
])
def test_config_file_mistakes_are_one_line_naming_key_and_file(
        cifar_root, tmp_path, capsys, sections, needles):
    path = _config_file(tmp_path, **sections)
    code = train_main(base(cifar_root, tmp_path, "--config-path", str(path), "--dry-run"))
    one_line_error(capsys, code, f"config file {path}", *needles)
    assert not (tmp_path / "chkpts").exists()


def test_schema_values_are_canonical_and_nan_is_refused():
    assert schema.check({"train": {"epochs": 1e3}}, "x") == {"train": {"epochs": 1000}}
    with pytest.raises(Exception, match="finite"):
        schema.check({"train": {"lr": float("nan")}}, "x")
    assert schema.normalize({"dataset": "celeba_hq", "denoise": {"hid_channels": 8}, "seed": 3}) \
        == {"dataset": {"name": "celebahq"}, "model": {"hid_channels": 8}, "train": {"seed": 3}}


def test_every_flag_maps_to_a_schema_key_and_the_readme_lists_every_key():
    for section, key in FLAG_TO_CONFIG.values():
        assert key in schema.SCHEMA[section], (section, key)
    readme = (ROOT / "README.md").read_text()
    assert markdown_table(FLAG_TO_CONFIG) in readme


def test_defaults_live_in_the_schema_and_help_shows_them():
    from ddpmkit.cli.train import build_parser

    help_text = build_parser().format_help()
    assert "(default: 0.0002)" in help_text and "configs/<dataset>.json sets: " in help_text
    assert "cifar10 2160" in help_text  # --epochs 50 becomes 2160 with the cifar10 config


# ---- run folders are never damaged ----------------------------------------------------------
def test_a_failed_resume_leaves_the_run_folder_byte_identical(cifar_root, tmp_path, capsys):
    assert train_main(base(cifar_root, tmp_path, "--max-steps", "2")) == 0
    folder = tmp_path / "chkpts" / "run"
    before = snapshot(folder)
    capsys.readouterr()
    code = train_main(base(cifar_root, tmp_path, "--resume", "--hid-channels", "64"))
    one_line_error(capsys, code, "different config", "model.hid_channels")
    assert snapshot(folder) == before


def test_failed_starts_write_nothing(cifar_root, tmp_path, capsys):
    code = train_main(base(cifar_root, tmp_path, "--resume"))
    one_line_error(capsys, code, "no checkpoint found")
    code = train_main(base(tmp_path / "nowhere", tmp_path))
    one_line_error(capsys, code, "not found")
    code = train_main(base(cifar_root, tmp_path, "--lr", "inf"))
    one_line_error(capsys, code, "--lr must be a finite number")
    assert not (tmp_path / "chkpts").exists() and not (tmp_path / "images").exists()


def test_a_new_run_into_another_runs_folder_needs_overwrite(cifar_root, tmp_path, capsys):
    assert train_main(base(cifar_root, tmp_path, "--max-steps", "3")) == 0
    folder = tmp_path / "chkpts" / "run"
    before = snapshot(folder)
    capsys.readouterr()
    code = train_main(base(cifar_root, tmp_path, "--max-steps", "2"))
    one_line_error(capsys, code, "already holds another run's checkpoints", "--overwrite",
                   "--resume")
    assert snapshot(folder) == before
    code = train_main(base(cifar_root, tmp_path, "--chkpt-path", str(folder / "x.pt")))
    one_line_error(capsys, code, "--chkpt-path names the checkpoint to resume from")
    assert train_main(base(cifar_root, tmp_path, "--max-steps", "2", "--overwrite")) == 0
    assert sorted(p.name for p in folder.glob("*.pt")) == ["ddpm_cifar10_step2.pt"]
    log = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2]


def test_output_paths_under_a_file_are_one_line(cifar_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    args = base(cifar_root, tmp_path, "--chkpt-dir", str(tmp_path / "afile" / "chk"))
    one_line_error(capsys, train_main(args), str(tmp_path / "afile"), "is a file, not a folder")
    from ddpmkit.cli.generate import main as generate_main

    code = generate_main(["--chkpt-path", str(tmp_path / "afile"), "--save-dir",
                          str(tmp_path / "afile" / "out")])
    one_line_error(capsys, code, "--save-dir", "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder_is_one_line(cifar_root, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    args = base(cifar_root, tmp_path, "--chkpt-dir", str(locked / "chk"))
    one_line_error(capsys, train_main(args), "no permission")


# ---- worker failures ------------------------------------------------------------------------
def test_num_gpus_without_cuda_is_refused_like_generate(cifar_root, tmp_path, capsys):
    code = train_main(base(cifar_root, tmp_path, "--distributed", "--rigid-launch",
                           "--num-gpus", "2"))
    one_line_error(capsys, code, "--num-gpus 2 needs 2 CUDA devices", "--train-device cpu")


@pytest.mark.slow
def test_an_error_in_spawned_workers_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset", "cifar10", "--root",
         str(tmp_path / "nowhere"), *TINY, "--distributed", "--rigid-launch", "--num-gpus",
         "2", "--train-device", "cpu", *run_args(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "ProcessRaisedException" not in proc.stderr
    assert lines[-1].startswith("error: ") and "not found" in lines[-1]
    assert not any(line.startswith("error: ") for line in lines[:-1])


def test_a_corrupt_image_is_refused_with_strict_images_else_skipped(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(folder / f"{i}.png")
    (folder / "8.png").write_bytes(b"not a png at all")
    args = ["--dataset", "folder", "--image-size", "32", "--root", str(folder), *TINY,
            "--num-workers", "2", "--batch-size", "8", "--max-steps", "1",
            "--num-save-images", "0", *run_args(tmp_path)]
    # Undecodable files are found at start: refused with --strict-images, else skipped.
    one_line_error(capsys, train_main([*args, "--strict-images"]), "8.png", "--strict-images")
    assert train_main(args) == 0


# ---- flags ----------------------------------------------------------------------------------
def test_negative_numbers_in_scientific_notation_are_values(capsys):
    code = ddpmkit_main(["train-toy", "--lr", "-1e-3"])
    one_line_error(capsys, code, "--lr must be positive, got -0.001")


def test_toy_nan_learning_rate_is_one_line(capsys):
    code = ddpmkit_main(["train-toy", "--lr", "nan"])
    one_line_error(capsys, code, "--lr must be a finite number")


def test_help_imports_no_torch_and_shows_defaults():
    script = ("import sys\nfrom ddpmkit.cli import main\n"
              "for argv in (['--help'], ['train', '--help'], ['train-toy', '--help'],\n"
              "             ['generate', '--help'], ['eval', '--help'], ['export', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(default: 1000)" in proc.stdout  # train --timesteps
    assert "(default: ddpm)" in proc.stdout  # generate --sampler


def test_a_run_shorter_than_the_log_interval_still_writes_its_log(cifar_root, tmp_path):
    args = [a for a in base(cifar_root, tmp_path, "--max-steps", "3")]
    i = args.index("--log-intv")
    args[i + 1] = "50"
    assert train_main(args) == 0
    log = [json.loads(line) for line in
           (tmp_path / "chkpts" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 3]  # the first update, and the end


def test_worker_counts_default_to_what_the_machine_has():
    from ddpmkit.cli.eval import build_parser
    from ddpmkit.data.images import available_cpus, default_num_workers

    assert build_parser().parse_args([]).num_workers is None
    assert 1 <= default_num_workers() <= min(4, available_cpus())


# ---- the toy command reruns -----------------------------------------------------------------
def test_toy_rerun_without_resume_keeps_the_saved_progress(tmp_path, capsys):
    args = ["train-toy", "--dataset", "gaussian8", "--size", "64", "--batch-size", "32",
            "--timesteps", "10", "--mid-features", "8", "--num-temporal-layers", "1",
            "--epochs", "1", "--num-eval-samples", "50", "--animation-format", "none",
            "--no-progress", "--chkpt-dir", str(tmp_path / "ck"), "--image-dir",
            str(tmp_path / "img")]
    assert ddpmkit_main(args) == 0
    first = snapshot(tmp_path)
    capsys.readouterr()
    for extra in ([], ["--lr", "5e-4"]):  # the same settings or others: refused like train
        line = one_line_error(capsys, ddpmkit_main([*args, *extra]),
                              "already holds another run's checkpoints", "--resume",
                              "--overwrite", "--chkpt-dir")
        assert "--exp-name" not in line  # train-toy has no such flag
        assert snapshot(tmp_path) == first
    assert ddpmkit_main([*args, "--lr", "5e-4", "--overwrite"]) == 0
