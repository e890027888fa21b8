"""Every command in the README parses with the current flags, and its Python example runs."""

import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

# how a README command names its subcommand module
SCRIPTS = {"train.py": "train", "train_toy.py": "train_toy", "generate.py": "generate",
           "eval.py": "eval", "train": "train", "train-toy": "train_toy",
           "generate": "generate", "eval": "eval", "export": "export"}


def _blocks(language):
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands():
    """(subcommand module, argv) for each ddpmkit / python X.py / torchrun X.py command."""
    found = []
    for block in _blocks("shell"):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                words = shlex.split(part)
                if not words:
                    continue
                if words[0] == "ddpmkit" and len(words) > 1 and words[1] in SCRIPTS:
                    found.append((SCRIPTS[words[1]], words[2:]))
                elif words[0] in ("python", "torchrun"):
                    scripts = [i for i, w in enumerate(words) if w in SCRIPTS and w.endswith(".py")]
                    if scripts:
                        i = scripts[0]
                        found.append((SCRIPTS[words[i]], words[i + 1:]))
    return found


COMMANDS = _commands()


def test_readme_has_the_commands_of_every_subcommand():
    assert {module for module, _ in COMMANDS} == {"train", "train_toy", "generate", "eval",
                                                  "export"}
    assert len(COMMANDS) >= 12


@pytest.mark.parametrize("module, argv", COMMANDS,
                         ids=[" ".join([m, *a])[:60] for m, a in COMMANDS])
def test_readme_command_parses(module, argv):
    import importlib

    parser = importlib.import_module(f"ddpmkit.cli.{module}").build_parser()
    parser.parse_args(argv)  # a bad flag raises (UserError or SystemExit)


def test_readme_python_example_runs():
    example = _blocks("python")[0]
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["points"].shape == (1000, 2)


def _section(title: str) -> str:
    """The README text under the heading `## title`, to the next `## ` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_training_from_python_runs(tmp_path, monkeypatch):
    """The `Training from Python` block: a toy run config from plain values, a few hundred
    updates, the checkpoint reloaded and sampled from, no argparse."""
    (block,) = re.findall(r"```python\n(.*?)```", _section("Training from Python"), flags=re.S)
    assert "argparse" not in block and "ddpmkit.cli" not in block
    assert len(block.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    saved, points = namespace["saved"], namespace["points"]
    assert saved["epochs"] == 15 and saved["device_resolved"] == "cpu"
    assert (tmp_path / "runs" / "toy" / "ddpm_gaussian8_15.pt").is_file()
    assert points.shape == (1000, 2) and bool(points.isfinite().all())
    from ddpmkit.data.toy import toy_mixture

    # Trained for 300 updates, most points lie near one of the 8 modes (std 0.014, radius
    # sqrt 2): measured 0.71 within 0.25 of one; an untrained network's samples 0.003.
    modes = toy_mixture("gaussian8").modes
    near = torch.cdist(points.double(), modes.double()).min(dim=1).values < 0.25
    assert near.double().mean() > 0.6


@pytest.mark.slow
def test_readme_quick_start_toy_run(tmp_path):
    """The main command of the quick start, as written, in a fresh folder."""
    import subprocess
    import sys

    first = _blocks("shell")[0]
    command = first.split("&&", 1)[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["ddpmkit", "train-toy"]
    proc = subprocess.run([sys.executable, "-m", "ddpmkit", *words[1:], "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "modes" in output and "KL" in output
    assert list(tmp_path.glob("chkpts/*.pt")) and list(tmp_path.glob("images/train/*/*.png"))


def test_readme_generate_finds_what_a_default_train_wrote(tmp_path, monkeypatch, one_thread):
    """`ddpmkit train --dataset cifar10` then `ddpmkit generate --dataset cifar10 ...` (the
    README's class-label example without a --chkpt-path) in the same folder: generate finds
    the checkpoint train wrote under ./chkpts/cifar10/."""
    from helpers import TINY, write_fake_cifar

    from ddpmkit.cli.generate import main as generate_main
    from ddpmkit.cli.train import main as train_main

    write_fake_cifar(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    examples = [argv for module, argv in COMMANDS if module == "generate"
                and "--chkpt-path" not in argv and argv[:2] == ["--dataset", "cifar10"]]
    assert examples  # the README shows such a command
    assert train_main(["--dataset", "cifar10", "--root", "data", *TINY, "--batch-size", "4",
                       "--max-steps", "2", "--precision", "fp32"]) == 0
    assert (tmp_path / "chkpts" / "cifar10").is_dir()
    assert generate_main(["--dataset", "cifar10", "--total-size", "2", "--batch-size", "2",
                          "--sampler", "ddim", "--steps", "2", "--precision", "fp32",
                          "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "images" / "eval" / "cifar10").glob("*.png")) \
        == ["000000.png", "000001.png"]


# The quick-start toy run takes minutes (tested as slow above); a download needs the network.
_OFFLINE = [(m, a) for m, a in COMMANDS if m != "train_toy" and "--download" not in a]


def test_readme_commands_in_an_empty_folder_end_cleanly(tmp_path, monkeypatch, capsys):
    """Every README command, typed in an empty folder (no data, checkpoints or GPUs): exit 0 or
    2 with one line saying what is missing, never a traceback, and nothing written."""
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/datasets, ~/photos: empty
    for module, argv in _OFFLINE:
        code = importlib.import_module(f"ddpmkit.cli.{module}").main(list(argv))
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_readme_checkpoint_paths_are_where_train_writes():
    """The checkpoints the README's generate / eval / export commands read are at the paths
    `ddpmkit train` writes (<chkpt-dir>/<dataset>/ddpm_<dataset>_<epoch>.pt) or the reference's
    (./chkpts/ddpm_<dataset>_<epoch>.pt)."""
    ours = re.compile(r"^\./chkpts/(\w+)/ddpm_\1_\d+\.pt$")
    reference = re.compile(r"^\./chkpts/ddpm_\w+_\d+\.pt$")
    paths = [a[a.index("--chkpt-path") + 1] for _, a in COMMANDS if "--chkpt-path" in a]
    paths += [a[0] for m, a in COMMANDS if m == "export"]
    checked = [p for p in paths if p.endswith(".pt")]
    assert len(checked) >= 5
    for path in checked:
        assert ours.match(path) or reference.match(path), path
