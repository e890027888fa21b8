"""`--precision auto`: bf16 only where the hardware has it (CUDA, CPUs with AVX512_BF16 / AMX),
fp32 elsewhere, said in the log and recorded in the run's config; an explicit bf16 on a CPU
that emulates it runs with a one-line warning."""

import json
import logging

import pytest
import torch
from helpers import TINY, run_args, tiny_config, write_fake_cifar

from ddpmkit.cli.train import main as train_main
from ddpmkit.runtime import devices

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture
def without_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))


@pytest.fixture
def with_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags",
                        lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))


def test_auto_picks_fp32_on_a_cpu_that_emulates_bf16(without_native_bf16):
    precision = devices.resolve_precision("auto", CPU)
    assert precision.name == "fp32"
    assert "no native bf16" in precision.reason and "slower" in precision.reason
    assert devices.resolve_precision(None, CPU).name == "fp32"


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(with_native_bf16):
    precision = devices.resolve_precision("auto", CPU)
    assert precision.name == "bf16" and "native bf16" in precision.reason
    assert "AVX512_BF16" in devices.cpu_capability() and "AMX_BF16" in devices.cpu_capability()


def test_explicit_bf16_on_an_emulating_cpu_warns_and_runs(without_native_bf16, caplog):
    with caplog.at_level(logging.WARNING):
        assert devices.resolve_precision("bf16", CPU).name == "bf16"
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "emulated" in record.getMessage() and "auto picks fp32" in record.getMessage()
    caplog.clear()
    assert devices.resolve_precision("fp32", CPU).name == "fp32" and not caplog.records


def test_the_cpu_flags_are_read_from_the_system(real_cpu_flags):
    flags = devices.cpu_flags()
    assert isinstance(flags, frozenset)
    assert devices.cpu_capability().split(" + ")[0] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_a_run_without_precision_records_what_auto_chose(tmp_path, monkeypatch, native,
                                                          expected):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    root = write_fake_cifar(tmp_path / "data", per_batch=2)
    assert train_main(["--dataset", "cifar10", "--root", str(root), *TINY, "--batch-size", "2",
                       "--dry-run", "--num-save-images", "0", *run_args(tmp_path)]) == 0
    config = json.loads((tmp_path / "chkpts" / "run" / "config.json").read_text())
    assert config["train"]["precision"] == expected


def test_train_help_offers_auto_as_the_default():
    from ddpmkit.cli.train import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "precision"]
    assert action.default == "auto" and "auto" in action.choices
    assert "(default: auto)" in build_parser().format_help()


def test_generate_records_the_chosen_precision(tmp_path, without_native_bf16):
    from ddpmkit.checkpoints.files import save_checkpoint
    from ddpmkit.cli.generate import main as generate_main
    from ddpmkit.models.loading import build_from_config

    model, _ = build_from_config(tiny_config())
    path = tmp_path / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": tiny_config()}, str(path))
    assert generate_main(["--chkpt-path", str(path), "--total-size", "1", "--sampler", "ddim",
                          "--steps", "1", "--save-dir", str(tmp_path / "out"),
                          "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "cifar10" / "generation.json").read_text())
    assert manifest["precision"] == "fp32"
