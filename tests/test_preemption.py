"""Long runs survive stops: SIGTERM / Ctrl-C mid-epoch, --max-steps mid-epoch, resume by step
with damaged files, stale temp files, full disks, the log after resumes, the reference's
config files, and torchrun restarts after a worker is killed."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, final_state, run_args, same_tensors, write_fake_cifar

from ddpmkit.checkpoints.files import load_checkpoint
from ddpmkit.cli.train import main
from ddpmkit.runtime.stops import RunControl, StopFlag
from ddpmkit.training.images import ImageTrainer

ROOT = Path(__file__).resolve().parents[1]
# Tiny models: intra-op threads would only fight over the shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE_CONFIGS = ROOT / "tests" / "data" / "reference" / "configs"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    # 40 training images: batch 4 gives 10 updates per epoch
    return write_fake_cifar(tmp_path_factory.mktemp("data"))


def common(cifar_root, *extra, batch=4):
    # dropout on, so a resumed run must restore the global RNG it draws from
    return ["--dataset", "cifar10", "--root", str(cifar_root), *TINY, "--batch-size",
            str(batch), "--use-ema", "--ema-decay", "0.9", "--drop-rate", "0.1",
            "--num-save-images", "0", "--precision", "fp32", *extra]


def same_training_state(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in ("model", "optimizer", "scheduler"):
        same_tensors(a[key], b[key])
    same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])


def _signal_self_at(monkeypatch, step, signum):
    """Send `signum` to this process during the forward pass after update `step`."""
    original = ImageTrainer.compute_loss

    def compute_loss(self, x_0):
        if self.step == step and self.micro_index == 0:
            os.kill(os.getpid(), signum)
        return original(self, x_0)

    monkeypatch.setattr(ImageTrainer, "compute_loss", compute_loss)


# ---- graceful stops -------------------------------------------------------------------------
def test_sigterm_mid_epoch_saves_that_step_and_resumes_bit_identically(
        cifar_root, tmp_path, monkeypatch, caplog):
    assert main([*common(cifar_root, "--epochs", "2"), *run_args(tmp_path, "straight")]) == 0
    with monkeypatch.context() as patch:
        _signal_self_at(patch, 3, signal.SIGTERM)
        assert main([*common(cifar_root, "--epochs", "2"), *run_args(tmp_path, "split")]) == 143
    folder = tmp_path / "chkpts" / "split"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["ddpm_cifar10_step4.pt"]
    stopped = load_checkpoint(str(folder / "ddpm_cifar10_step4.pt"))
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (4, 0, 4)
    assert any("stopped by SIGTERM at step 4" in r.getMessage()
               and "ddpm_cifar10_step4.pt" in r.getMessage() for r in caplog.records)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed
    assert main([*common(cifar_root, "--epochs", "2", "--resume"),
                 *run_args(tmp_path, "split")]) == 0
    same_training_state(final_state(tmp_path, "straight"), final_state(tmp_path, "split"))


def test_ctrl_c_stops_with_status_130(cifar_root, tmp_path, monkeypatch):
    _signal_self_at(monkeypatch, 2, signal.SIGINT)
    assert main([*common(cifar_root, "--epochs", "2"), *run_args(tmp_path)]) == 130
    assert final_state(tmp_path)["step"] == 3


def test_a_second_ctrl_c_aborts_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    with StopFlag() as stop:
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGTERM, None)  # senders repeat SIGTERM: still a graceful stop
        assert stop.signum == signal.SIGTERM and exits == []
        stop._handle(signal.SIGINT, None)
    assert exits == [130]
    assert "aborted by a second SIGINT" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_ignores_the_terminals_ctrl_c(caplog):
    """Ctrl-C reaches every process of the terminal's group, DataLoader workers included:
    only the process that installed the flag records and announces it (once)."""
    with StopFlag() as stop:
        pid = os.fork()
        if pid == 0:  # the "worker": its inherited handler must do nothing
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(0 if stop.signum is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
    assert [r.getMessage()[:15] for r in caplog.records] == ["SIGINT received"]


def test_a_stop_during_epoch_end_work_stops_before_the_next_update(tmp_path):
    from ddpmkit.data.toy import TensorBatches, make_toy_data, toy_generator
    from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule
    from ddpmkit.models.toy import ToyMLP
    from ddpmkit.training.trainer import Trainer, make_callback

    stop = StopFlag(announce=False)  # not installed: requested directly
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 10, 1e-3, 0.2), "eps",
                                  "fixed-small", "mse", decoder="continuous")
    data = TensorBatches(make_toy_data("gaussian8", 64, toy_generator(0)), 16, seed=0)
    trainer = Trainer(ToyMLP(2, 8, 1), diffusion, data, epochs=3, progress=False, stop=stop,
                      chkpt_dir=str(tmp_path), chkpt_prefix="toy",
                      callbacks=[make_callback(on_epoch_end=lambda t: stop.request(15))])
    result = trainer.fit()
    assert result["stopped"] == 15 and (result["step"], result["epoch"]) == (4, 1)
    assert os.listdir(tmp_path) == ["toy_1.pt"]


def test_run_control_decides_saves_by_the_clock_once_each():
    now = [0.0]
    control = RunControl(every_s=10.0, clock=lambda: now[0])
    assert not control.poll().save
    now[0] = 10.0
    assert control.poll().save
    control.saved()
    assert not control.poll().save
    now[0] = 25.0
    decision = control.poll()
    assert decision.save and decision.stop is None


def test_the_toy_trainer_stops_as_cleanly_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    from ddpmkit.cli import main as ddpmkit_main
    from ddpmkit.training.trainer import Trainer

    args = ["train-toy", "--dataset", "gaussian8", "--size", "128", "--batch-size", "32",
            "--timesteps", "10", "--mid-features", "16", "--num-temporal-layers", "1",
            "--epochs", "3", "--ema-decay", "0.9", "--num-eval-samples", "50",
            "--eval-intv", "10", "--animation-format", "none", "--no-progress"]
    assert ddpmkit_main([*args, "--chkpt-dir", str(tmp_path / "a"), "--image-dir",
                         str(tmp_path / "ia")]) == 0
    original = Trainer.compute_loss

    def compute_loss(self, x_0):
        if self.step == 5 and self.micro_index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, x_0)

    b = ["--chkpt-dir", str(tmp_path / "b"), "--image-dir", str(tmp_path / "ib")]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "compute_loss", compute_loss)
        assert ddpmkit_main([*args, *b]) == 143
    assert "stopped by SIGTERM at step 6" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "b")) == [
        "ddpm_gaussian8_config.json", "ddpm_gaussian8_log.jsonl", "ddpm_gaussian8_step6.pt"]
    assert ddpmkit_main([*args, *b, "--resume"]) == 0
    same_training_state(load_checkpoint(str(tmp_path / "a" / "ddpm_gaussian8_3.pt")),
                        load_checkpoint(str(tmp_path / "b" / "ddpm_gaussian8_3.pt")))


def test_generation_stops_after_the_batch_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    from helpers import tiny_config

    from ddpmkit.checkpoints.files import save_checkpoint
    from ddpmkit.cli.generate import main as generate_main
    from ddpmkit.models.loading import build_from_config
    from ddpmkit.sampling import folder as sample_folder

    model, _ = build_from_config(tiny_config())
    path = tmp_path / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": tiny_config()}, str(path))
    argv = ["--chkpt-path", str(path), "--total-size", "6", "--batch-size", "2", "--sampler",
            "ddim", "--steps", "2", "--save-dir", str(tmp_path / "out"), "--no-progress"]
    original, calls = sample_folder.sample_indexed, []

    def sample_indexed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sample_folder, "sample_indexed", sample_indexed)
        assert generate_main(argv) == 143
    out = capsys.readouterr().out
    assert "stopped by SIGTERM: 4 of 6 samples" in out and "run the same command again" in out
    folder = tmp_path / "out" / "cifar10"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert generate_main(argv) == 0
    assert len(list(folder.glob("*.png"))) == 6


def _launch(argv, cwd):
    return subprocess.Popen([sys.executable, "-m", "ddpmkit", "train", *argv], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_log(path: Path, proc, more_than=0, timeout=120.0):
    """Wait until the run's log has more than `more_than` lines (it has started training)."""
    start = time.time()
    while _log_lines(path) <= more_than:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, "the run wrote no log"
        time.sleep(0.05)


@pytest.mark.slow
def test_external_sigterm_and_double_ctrl_c(cifar_root, tmp_path):
    """From outside, as a cluster or a user does it: SIGTERM ends with 143 and a one-line
    message naming the checkpoint; two Ctrl-C's end with 130 and no traceback."""
    big = write_fake_cifar(tmp_path / "big", per_batch=40)  # 50 updates per epoch
    argv = [*common(big, "--epochs", "1"), *run_args(tmp_path)]
    proc = _launch(argv, tmp_path)
    _wait_for_log(tmp_path / "chkpts" / "run" / "log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM at step" in err
    state = final_state(tmp_path)
    assert f"ddpm_cifar10_step{state['step']}.pt" in err and state["batch_in_epoch"] > 0

    log = tmp_path / "chkpts" / "run" / "log.jsonl"
    proc = _launch([*argv, "--resume"], tmp_path)
    _wait_for_log(log, proc, more_than=state["step"])  # the resumed run's first update
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "aborted by a second SIGINT" in err or "stopped by SIGINT" in err
    assert final_state(tmp_path)["step"] >= state["step"]  # whatever survived is whole


def test_a_restarted_overwrite_replaces_the_old_run_until_it_has_started(
        cifar_root, tmp_path, monkeypatch, caplog):
    """torchrun restarts workers with the same flags: with --overwrite, a restart resumes
    only the new run (its config.json is written at its first update), never the old one."""
    assert main([*common(cifar_root, "--max-steps", "3", "--lr", "1e-3"),
                 *run_args(tmp_path)]) == 0  # the old run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    new_run = [*common(cifar_root, "--max-steps", "2", "--overwrite"), *run_args(tmp_path)]
    caplog.clear()
    assert main(new_run) == 0  # the first attempt "died" before it started: replace
    assert not any("resumed from" in r.getMessage() for r in caplog.records)
    assert final_state(tmp_path)["step"] == 2
    caplog.clear()
    assert main(new_run) == 0  # a later restart: the new run has started, so resume it
    assert any("resumed from" in r.getMessage() and "step 2" in r.getMessage()
               for r in caplog.records)
    assert final_state(tmp_path)["step"] == 2


# ---- stops by step count, and what resume picks ---------------------------------------------
def test_max_steps_mid_epoch_saves_its_final_state(cifar_root, tmp_path, caplog):
    assert main([*common(cifar_root, "--epochs", "2", "--max-steps", "13"),
                 *run_args(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "chkpts" / "run").glob("*.pt"))
    assert names == ["ddpm_cifar10_step13.pt"]
    caplog.clear()
    assert main([*common(cifar_root, "--epochs", "2", "--resume"), *run_args(tmp_path)]) == 0
    assert any("resumed from" in r.getMessage() and "step 13" in r.getMessage()
               for r in caplog.records)
    assert final_state(tmp_path)["step"] == 20


def test_auto_resume_starts_fresh_then_continues(cifar_root, tmp_path, caplog):
    args = [*common(cifar_root, "--epochs", "1", "--auto-resume", batch=8), *run_args(tmp_path)]
    assert main([*args, "--max-steps", "2"]) == 0  # nothing to resume: a fresh start
    assert final_state(tmp_path)["step"] == 2
    caplog.clear()
    assert main(args) == 0
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    assert final_state(tmp_path)["step"] == 5


def test_resume_takes_the_highest_step_not_the_newest_file(cifar_root, tmp_path, caplog):
    args = [*common(cifar_root, "--epochs", "3", "--chkpt-intv", "1", batch=8),
            *run_args(tmp_path)]  # 5 updates per epoch
    assert main([*args, "--max-steps", "10"]) == 0
    folder = tmp_path / "chkpts" / "run"
    os.utime(folder / "ddpm_cifar10_1.pt")  # the step-5 file is now the newest by time
    caplog.clear()
    assert main([*args, "--resume"]) == 0
    assert any("ddpm_cifar10_2.pt (epoch 2, step 10)" in r.getMessage() for r in caplog.records)


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(
        cifar_root, tmp_path, caplog):
    args = [*common(cifar_root, "--epochs", "3", "--chkpt-intv", "1", batch=8),
            *run_args(tmp_path)]  # 5 updates per epoch
    assert main([*args, "--max-steps", "10"]) == 0
    folder = tmp_path / "chkpts" / "run"
    newest = folder / "ddpm_cifar10_2.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated, as by a dying disk
    caplog.clear()
    assert main([*args, "--resume"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("skipping damaged checkpoint" in w and "ddpm_cifar10_2.pt" in w
               and "resuming from" in w and "ddpm_cifar10_1.pt" in w for w in warnings)
    assert (folder / "ddpm_cifar10_2.pt.damaged").is_file()  # set aside, not deleted
    assert final_state(tmp_path)["step"] == 15


def test_stale_temp_files_of_this_run_are_removed_and_no_others(cifar_root, tmp_path):
    folder = tmp_path / "chkpts" / "run"
    folder.mkdir(parents=True)
    ours = [".ddpm_cifar10_step3.pt.k2j.tmp", ".ddpm_cifar10_2.pt.x.tmp", ".config.json.a.tmp",
            ".log.jsonl.b.tmp"]
    others = [".ddpm_mnist_2.pt.x.tmp", ".notes.txt.c.tmp", "ddpm_cifar10_2.pt.tmp"]
    for name in ours + others:
        (folder / name).write_bytes(b"half a file")
    assert main([*common(cifar_root, "--max-steps", "2"), *run_args(tmp_path)]) == 0
    left = set(os.listdir(folder))
    assert not left & set(ours) and set(others) <= left


# ---- write errors ---------------------------------------------------------------------------
def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(
        cifar_root, tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2 and hasattr(f, "fileno"):
            f = FullDisk(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code = main([*common(cifar_root, "--epochs", "3", "--chkpt-intv", "1"), *run_args(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and "ddpm_cifar10_2.pt" in lines[0]
    folder = tmp_path / "chkpts" / "run"
    assert sorted(os.listdir(folder)) == ["config.json", "ddpm_cifar10_1.pt", "log.jsonl"]
    assert load_checkpoint(str(folder / "ddpm_cifar10_1.pt"))["step"] == 10


@pytest.mark.slow
def test_a_real_file_size_limit_is_reported_in_one_line(cifar_root, tmp_path):
    """The kernel refuses the write (EFBIG under RLIMIT_FSIZE): the same one line."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "ddpmkit", "train",
                           *common(cifar_root, "--max-steps", "2"), *run_args(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "cannot write" in proc.stderr and "File too large" in proc.stderr
    assert not list((tmp_path / "chkpts" / "run").glob(".*tmp"))


# ---- the log after resumes ------------------------------------------------------------------
def test_the_log_has_each_step_once_after_a_crash_and_resume(cifar_root, tmp_path, monkeypatch):
    args = [*common(cifar_root, "--epochs", "2", "--chkpt-every-steps", "3"), *run_args(tmp_path)]
    original = ImageTrainer._after_update

    def crash_at_8(self):
        original(self)
        if self.step == 8:
            raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(ImageTrainer, "_after_update", crash_at_8)
        with pytest.raises(RuntimeError, match="killed"):
            main(args)
    log = tmp_path / "chkpts" / "run" / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == \
        list(range(1, 9))
    assert main([*args, "--resume"]) == 0  # from step 6
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 21))


# ---- the reference project's config files ---------------------------------------------------
@pytest.mark.parametrize("name, dataset, resolution, var_type", [
    ("cifar10", "cifar10", 32, "fixed-large"), ("celeba", "celeba", 64, "fixed-small"),
    ("celebahq", "celebahq", 256, "fixed-small"), ("celeba_denoise", "cifar10", 32,
                                                   "fixed-small")])
def test_reference_config_files_resolve_unchanged(name, dataset, resolution, var_type):
    from ddpmkit.cli.train import build_parser, resolve_config, validate_config
    from ddpmkit.config import parse_with_explicit
    from ddpmkit.config.facts import complete_dataset_facts

    path = REFERENCE_CONFIGS / f"{name}.json"
    args, typed = parse_with_explicit(build_parser(), ["--config-path", str(path)])
    config = resolve_config(args, typed)
    validate_config(config)
    config = complete_dataset_facts(config)
    assert config["dataset"]["name"] == dataset
    assert config["dataset"]["resolution"] == resolution
    assert config["diffusion"]["model_var_type"] == var_type
    assert config["model"]["in_channels"] == 3 and config["train"]["use_ema"] == (
        name != "celeba_denoise")


@pytest.mark.slow
def test_reference_config_trains_and_generates(cifar_root, tmp_path):
    """Its full CIFAR-10 network (35.7M parameters): one update, then samples from a bare
    state dict with the same file naming the architecture."""
    cifar = str(REFERENCE_CONFIGS / "cifar10.json")
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config-path", cifar, "--root",
         str(cifar_root), "--dry-run", "--batch-size", "2", "--num-workers", "0",
         "--num-save-images", "0", *run_args(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    state = final_state(tmp_path)
    bare = tmp_path / "bare.pt"
    torch.save(state["model"], bare)
    gen = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--config-path", cifar, "--chkpt-path",
         str(bare), "--use-ddim", "--subseq-size", "2", "--total-size", "2", "--batch-size",
         "2", "--save-dir", str(tmp_path / "samples")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(list((tmp_path / "samples" / "cifar10").glob("*.png"))) == 2


# ---- torchrun restarts ----------------------------------------------------------------------
def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _torchrun(argv, cwd, restarts):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         f"--max_restarts={restarts}", str(ROOT / "train.py"), "--distributed", *argv],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_identical(cifar_root, tmp_path):
    big = write_fake_cifar(tmp_path / "big", per_batch=16)  # 80 images, 20 updates per epoch
    argv = [*common(big, "--epochs", "2", "--drop-rate", "0", "--chkpt-every-steps", "4")]
    straight = _torchrun([*argv, *run_args(tmp_path, "straight")], tmp_path, restarts=0)
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]

    proc = _torchrun([*argv, *run_args(tmp_path, "killed")], tmp_path, restarts=2)
    log = tmp_path / "chkpts" / "killed" / "log.jsonl"
    start = time.time()
    while not log.is_file() or len(log.read_text().splitlines()) < 9:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert "resumed from" in err
    same_training_state(final_state(tmp_path, "straight"), final_state(tmp_path, "killed"))
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert sorted(steps) == sorted(set(steps)) and steps[-1] == 40
