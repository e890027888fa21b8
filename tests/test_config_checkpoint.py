"""Config precedence, device parsing and the atomic, safe checkpoint files."""

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from ddpmkit.checkpoints.files import (
    CheckpointFiles,
    load_checkpoint,
    newest_checkpoint,
    newest_file,
    save_checkpoint,
)
from ddpmkit.config import deep_update, find_config_file, parse_with_explicit
from ddpmkit.errors import UserError
from ddpmkit.runtime.devices import resolve_device


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--use-ema", action="store_true")
    return p


def test_parse_with_explicit_reports_only_typed_flags():
    args, typed = parse_with_explicit(_parser(), ["--lr", "1e-3"])
    assert args.lr == 1e-3 and args.epochs == 50 and args.use_ema is False
    assert typed == {"lr"}
    args, typed = parse_with_explicit(_parser(), ["--epochs", "50", "--use-ema"])
    assert typed == {"epochs", "use_ema"}  # typed even though equal to the default
    # the parser's defaults are restored afterwards
    assert _parser().parse_args([]).lr == parse_with_explicit(_parser(), [])[0].lr == 2e-4


def test_deep_update_merges_nested_sections():
    base = {"train": {"lr": 1, "epochs": 2}, "model": {"ch": 3}}
    out = deep_update(base, {"train": {"lr": 5}})
    assert out == {"train": {"lr": 5, "epochs": 2}, "model": {"ch": 3}}
    assert base["train"]["lr"] == 1  # the input is not modified


def test_find_config_file_errors_clearly(tmp_path):
    with pytest.raises(UserError, match="no config for dataset"):
        find_config_file("nosuchdata", config_dir=str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        find_config_file("cifar10", config_path=str(tmp_path / "x.json"))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(UserError, match="invalid device"):
        resolve_device("floppy")


def test_checkpoint_round_trip_and_format_version(tmp_path):
    path = tmp_path / "c" / "model_3.pt"
    state = {"model": {"w": torch.arange(4.0)}, "step": 3, "config": {"a": [1, 2]}}
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["step"] == 3 and loaded["config"] == {"a": [1, 2]}
    assert loaded["format_version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["model_3.pt"]  # no temp file left


def test_newest_checkpoint_is_the_highest_step_not_the_newest_file(tmp_path):
    files = CheckpointFiles(str(tmp_path), "run")
    for i, (name, step) in enumerate((("run_9.pt", 90), ("run_step95.pt", 95), ("run_2.pt", 20))):
        save_checkpoint({"step": step}, str(tmp_path / name))
        os.utime(tmp_path / name, (1000 + i, 1000 + i))  # run_2.pt is the newest file
    (tmp_path / ".run_11.pt.abc.tmp").write_bytes(b"half")  # an interrupted write
    (tmp_path / "other_99.pt").write_bytes(b"another run")
    assert [os.path.basename(p) for p in files.all()] == ["run_2.pt", "run_9.pt", "run_step95.pt"]
    point = newest_checkpoint(files.all())
    assert os.path.basename(point.path) == "run_step95.pt" and point.state["step"] == 95
    assert newest_file(files.all()) == point.path
    assert newest_checkpoint(CheckpointFiles(str(tmp_path / "empty"), "run").all()) is None
    assert [os.path.basename(p) for p in files.stale_temp_files()] == [".run_11.pt.abc.tmp"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    save_checkpoint({"step": 10}, str(tmp_path / "run_1.pt"))
    save_checkpoint({"step": 20, "w": torch.zeros(1000)}, str(tmp_path / "run_step20.pt"))
    data = (tmp_path / "run_step20.pt").read_bytes()
    (tmp_path / "run_step20.pt").write_bytes(data[: len(data) // 2])  # truncated
    point = newest_checkpoint(CheckpointFiles(str(tmp_path), "run").all())
    assert point.state["step"] == 10
    assert [os.path.basename(p) for p, _ in point.damaged] == ["run_step20.pt"]
    (tmp_path / "run_1.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable checkpoint"):  # never a silent restart
        newest_checkpoint(CheckpointFiles(str(tmp_path), "run").all())


def test_rolling_checkpoints_keep_the_last_two(tmp_path):
    files = CheckpointFiles(str(tmp_path), "run")
    for step in (5, 10, 15):
        save_checkpoint({"step": step}, files.rolling(step))
    save_checkpoint({"step": 12}, files.permanent(3))
    assert [os.path.basename(p) for p in files.prune_rolling()] == ["run_step5.pt"]
    assert sorted(os.listdir(tmp_path)) == ["run_3.pt", "run_step10.pt", "run_step15.pt"]


def test_corrupt_and_missing_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(str(bad))
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.randn(1000)}, str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(str(truncated))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, str(path))
    with pytest.raises(UserError, match="not safe"):
        load_checkpoint(str(path))


def test_numpy_scalar_only_with_allow_list(tmp_path):
    path = tmp_path / "ref.pt"
    torch.save({"model": {"w": torch.ones(2)}, "fid": np.float64(3.25)}, str(path))
    with pytest.raises(UserError):
        load_checkpoint(str(path))
    assert float(load_checkpoint(str(path), allow_numpy_scalars=True)["fid"]) == 3.25


def test_sigkill_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "chkpt.pt"
    save_checkpoint({"generation": 0, "w": torch.zeros(10)}, str(path))
    script = textwrap.dedent(f"""
        import torch
        from ddpmkit.checkpoints.files import save_checkpoint
        big = torch.randn(8_000_000)  # 32 MB: slow enough to be killed mid-write
        i = 1
        while True:
            save_checkpoint({{"generation": i, "w": big}}, {str(path)!r})
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        time.sleep(3.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    loaded = load_checkpoint(str(path))  # old or new, but whole
    assert loaded["generation"] >= 0 and loaded["w"].numel() in (10, 8_000_000)
