"""Shared fixtures."""

import os

import pytest
import torch

from ddpmkit.runtime import devices

READ_CPU_FLAGS = devices.cpu_flags  # the probe itself, before any test patches it


@pytest.fixture(scope="session", autouse=True)
def single_threaded():
    """The tests run tiny tensors: intra-op threads only fight over the shared cores (runs
    vary 10x, and a busy machine makes spinning OpenMP threads far slower still). One thread
    here, and in the subprocesses the tests start (OMP_NUM_THREADS), unless the user set it."""
    threads = torch.get_num_threads()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(threads)
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS", None)


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """Image-folder indexes are cached under $XDG_CACHE_HOME: the tests' go to a temporary
    folder, never the user's cache."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """`--precision auto`, the default of train and generate, picks bf16 on a CPU with native
    bf16 (AVX512_BF16 / AMX) and fp32 elsewhere, so a test comparing numbers would pass on one
    CPU and fail on another. In this process every test sees the CPU's flags minus the bf16
    ones; tests of the probe patch `cpu_flags` themselves (`real_cpu_flags` restores it), and
    tests that start other processes pass `--precision fp32`."""
    flags = READ_CPU_FLAGS() - frozenset(devices.NATIVE_BF16_FLAGS)
    patch = pytest.MonkeyPatch()
    patch.setattr(devices, "cpu_flags", lambda: flags)
    yield
    patch.undo()


@pytest.fixture
def real_cpu_flags(monkeypatch):
    """The probe as it reads the system (undoing `cpu_without_native_bf16` for one test)."""
    monkeypatch.setattr(devices, "cpu_flags", READ_CPU_FLAGS)


@pytest.fixture(scope="module")
def one_thread():
    """Kept for the tests that ask for it by name (every test now runs single-threaded)."""
    yield
