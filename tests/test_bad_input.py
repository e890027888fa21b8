"""Bad input, as a new user types it: one row per case, each a command that must end with a
one-line error (exit 2, no traceback) and leave every file exactly as it was (sha256 of the
whole folder tree before and after). Add a row for every such report.

The workspace (module-scoped, the working folder of every command) holds a real `train` run
(`chkpts/cifar10/`), a copy of its checkpoint (`model.pt`), a `train-toy` run with saved
progress (`chkpts/ddpm_gaussian8_*.pt`), an earlier export with a file of the user's added
(`exported/`), a folder of the user's files (`mine/`), a PNG of the user's named like a sample
(`shots/cifar10/000000.png`), a binary "config" and fake CIFAR-10.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from helpers import TINY, one_line_error, write_fake_cifar

from ddpmkit.cli import main as ddpmkit_main

TOY = ["train-toy", "--dataset", "gaussian8", "--size", "64", "--batch-size", "32",
       "--timesteps", "10", "--mid-features", "8", "--num-temporal-layers", "1", "--epochs", "1",
       "--num-eval-samples", "50", "--animation-format", "none", "--no-progress"]
TRAIN = ["train", "--dataset", "cifar10", "--root", "data", *TINY, "--batch-size", "4",
         "--num-save-images", "0", "--precision", "fp32", "--max-steps", "2"]
GENERATE = ["generate", "--chkpt-path", "model.pt", "--total-size", "2", "--sampler", "ddim",
            "--steps", "2", "--precision", "fp32", "--no-progress"]


def tree_hashes(folder: Path) -> dict:
    """{relative path: sha256 of its bytes, or 'dir' / 'link -> target'} for the whole tree."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        write_fake_cifar(ws / "data")
        assert ddpmkit_main(TRAIN) == 0  # ./chkpts/cifar10/ddpm_cifar10_step2.pt, log, config
        (saved,) = (ws / "chkpts" / "cifar10").glob("ddpm_cifar10_*.pt")
        shutil.copy(saved, ws / "model.pt")
        assert ddpmkit_main(TOY) == 0  # ./chkpts/ddpm_gaussian8_1.pt, its log and config
        assert ddpmkit_main(["export", "model.pt", "--format", "diffusers", "exported"]) == 0
        (ws / "exported" / "mine.txt").write_text("the user's notes")
        (ws / "mine").mkdir()
        (ws / "mine" / "thesis.tex").write_text("months of work")
        (ws / "mine" / "cifar10_x_grid.png").write_bytes(b"the user's picture")
        (ws / "shots" / "cifar10").mkdir(parents=True)
        (ws / "shots" / "cifar10" / "000000.png").write_bytes(b"a photo named like a sample")
        (ws / "notes.txt").write_text("not a model")
        (ws / "binary.json").write_bytes(bytes(range(256)))
    finally:
        os.chdir(cwd)
    return ws


# (command, what the one-line error says)
ROWS = [
    # export --overwrite replaces only what ddpmkit wrote
    (["export", "model.pt", "--format", "diffusers", ".", "--overwrite"], "working folder"),
    (["export", "model.pt", "--format", "diffusers", "chkpts/cifar10", "--overwrite"],
     "not written by ddpmkit"),
    (["export", "chkpts/cifar10/ddpm_cifar10_step2.pt", "--format", "diffusers", "chkpts",
      "--overwrite"], "holds the input"),
    (["export", "model.pt", "--format", "diffusers", "mine", "--overwrite"],
     "not written by ddpmkit"),
    (["export", "model.pt", "--format", "diffusers", "exported", "--overwrite"],
     "did not write (mine.txt)"),
    (["export", "model.pt", "--format", "diffusers", "exported"], "--overwrite"),
    (["export", "model.pt", "--format", "safetensors", "model.pt", "--overwrite"],
     "is the input"),
    (["export", "model.pt", "--format", "safetensors", "notes.txt", "--overwrite"],
     "not a file ddpmkit wrote"),
    (["export", "model.pt", "--format", "diffusers", "notes.txt", "--overwrite"], "is a file"),
    (["export", "model.pt", "--format", "diffusers", "/proc/x"], "/proc/x"),
    (["export", "model.pt", "--format", "safetensors", "/proc/x/m.safetensors"], "/proc"),
    # saved progress is never replaced without --overwrite
    (TOY, "already holds another run's checkpoints"),
    ([*TOY, "--lr", "5e-4"], "already holds another run's checkpoints"),
    (TRAIN, "already holds another run's checkpoints"),
    # output paths checked before any work
    ([*TOY, "--chkpt-dir", "/proc/x"], "/proc/x"),
    ([*TOY, "--image-dir", "/proc/x", "--chkpt-dir", "new"], "/proc/x"),
    ([*TRAIN, "--chkpt-dir", "/proc/x"], "/proc/x"),
    ([*TRAIN, "--image-dir", "/proc/x", "--exp-name", "new"], "/proc/x"),
    ([*TRAIN, "--chkpt-dir", "notes.txt", "--exp-name", "new"], "is a file, not a folder"),
    ([*TRAIN, "--eval", "--precomputed-dir", "/proc/x", "--exp-name", "new"],
     "--precomputed-dir /proc/x"),
    ([*GENERATE, "--save-dir", "/proc/x"], "--save-dir /proc/x"),
    ([*GENERATE, "--save-dir", "notes.txt/x"], "is a file, not a folder"),
    ([*GENERATE, "--save-dir", "mine", "--suffix", "_x", "--grid"], "not a file ddpmkit wrote"),
    # sample-named PNGs without a manifest would be counted as done samples
    ([*GENERATE, "--save-dir", "shots"], "but no generation.json"),
    (["eval", "--dataset", "cifar10", "--sample-folder", "/proc/x/samples", "--metrics", "fid"],
     "/proc"),
    (["eval", "--dataset", "cifar10", "--sample-folder", "mine", "--metrics", "fid",
      "--precomputed-dir", "/proc/x"], "--precomputed-dir /proc/x"),
    # every number finite
    ([*GENERATE, "--eta", "nan"], "--eta must be a finite number"),
    ([*GENERATE, "--sampler", "ddpm", "--guidance-scale", "inf"], "--guidance-scale"),
    ([*TRAIN, "--lr", "nan", "--exp-name", "new"], "--lr must be a finite number"),
    ([*TOY, "--fourier-scale", "-inf", "--chkpt-dir", "new"], "--fourier-scale"),
    (["eval", "--dataset", "cifar10", "--sample-folder", "mine", "--metrics", "kid",
      "--kid-subset-size", "nan"], "--kid-subset-size"),
    # config files
    ([*TRAIN, "--config-path", "binary.json", "--exp-name", "new"], "not a UTF-8 JSON"),
    # small messages
    ([*TRAIN, "--guidance-scale", "2", "--exp-name", "new"], "--guidance-scale applies to"),
]


@pytest.mark.parametrize("argv, needle", ROWS, ids=[" ".join(a)[:70] for a, _ in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(workspace, monkeypatch, capsys, argv,
                                                   needle):
    monkeypatch.chdir(workspace)
    before = tree_hashes(workspace)
    capsys.readouterr()
    code = ddpmkit_main(list(argv))
    one_line_error(capsys, code, needle)
    assert tree_hashes(workspace) == before


def test_the_workspace_holds_what_the_rows_assume(workspace):
    names = set(tree_hashes(workspace))
    for expected in ("chkpts/cifar10/ddpm_cifar10_step2.pt", "chkpts/cifar10/log.jsonl",
                     "chkpts/ddpm_gaussian8_1.pt", "exported/.ddpmkit-written.json",
                     "exported/mine.txt", "model.pt"):
        assert expected in names, sorted(names)


def test_overwrite_replaces_an_export_of_ddpmkit(workspace, monkeypatch, capsys, caplog):
    """The counterpart of the refusals: an earlier export holding nothing else is replaced;
    its files have the modes of the umask, and it says it is using (not sampling) weights."""
    monkeypatch.chdir(workspace)
    caplog.set_level("INFO")
    assert ddpmkit_main(["export", "model.pt", "--format", "diffusers", "again"]) == 0
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "using the EMA weights" in said and "sampling" not in said
    marker = (workspace / "again" / ".ddpmkit-written.json").read_bytes()
    assert ddpmkit_main(["export", "model.pt", "--format", "diffusers", "again",
                         "--overwrite", "--no-ema"]) == 0
    assert (workspace / "again" / ".ddpmkit-written.json").read_bytes() == marker
    weights = workspace / "again" / "unet" / "diffusion_pytorch_model.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    shutil.rmtree(workspace / "again")


def test_too_little_space_for_one_checkpoint_is_one_line(workspace, monkeypatch, capsys):
    import collections

    import ddpmkit.utils.io as io_module

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 2**10))
    monkeypatch.chdir(workspace)
    before = tree_hashes(workspace)
    capsys.readouterr()
    code = ddpmkit_main([*TRAIN, "--exp-name", "new"])
    one_line_error(capsys, code, "checkpoint folder", "1 KiB free", "one checkpoint needs")
    code = ddpmkit_main([*TOY, "--chkpt-dir", "new"])
    one_line_error(capsys, code, "checkpoint folder new", "1 KiB free", "one checkpoint needs")
    assert tree_hashes(workspace) == before


@pytest.mark.parametrize("fmt, out", [("diffusers", "new_export"),
                                      ("safetensors", "new.safetensors")])
def test_too_little_space_for_the_export_is_one_line(workspace, monkeypatch, capsys, fmt, out):
    import collections

    import ddpmkit.utils.io as io_module

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 2**10))
    monkeypatch.chdir(workspace)
    before = tree_hashes(workspace)
    capsys.readouterr()
    code = ddpmkit_main(["export", "model.pt", "--format", fmt, out])
    one_line_error(capsys, code, "output folder", "1 KiB free", "the export needs")
    assert tree_hashes(workspace) == before


def test_export_into_the_empty_working_folder_is_refused(workspace, monkeypatch, capsys):
    empty = workspace / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code = ddpmkit_main(["export", "../model.pt", "--format", "diffusers", "."])
    one_line_error(capsys, code, "working folder")
    assert list(empty.iterdir()) == []
    os.chdir(workspace)
    empty.rmdir()


def test_a_rerun_of_generate_replaces_its_own_grid(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    argv = [*GENERATE, "--save-dir", "gen", "--grid", "--grid-size", "2"]
    assert ddpmkit_main(argv) == 0
    grid = workspace / "gen" / "cifar10_grid.png"
    first = grid.read_bytes()
    grid.write_bytes(b"stale")
    assert ddpmkit_main(argv) == 0 and grid.read_bytes() == first
    shutil.rmtree(workspace / "gen")


def test_version(capsys):
    from ddpmkit import __version__

    assert ddpmkit_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ddpmkit {__version__}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
