"""runtime/: each process's device (one rule for training and generation), exit codes, and the
logging setup that the commands and spawned workers share."""

import signal

import pytest
import torch

from ddpmkit.errors import UserError
from ddpmkit.runtime.distributed import DistInfo, process_device
from ddpmkit.runtime.stops import exit_code

ONE, TWO = DistInfo(0, 1, 0), DistInfo(1, 2, 1)


@pytest.mark.parametrize("spec", ["cpu", " cpu "])
def test_cpu_stays_cpu_with_any_number_of_processes(spec):
    assert process_device(spec, ONE) == torch.device("cpu")
    assert process_device(spec, TWO) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda():
    assert process_device("auto", TWO) == torch.device("cpu")
    assert process_device("auto", ONE) == torch.device("cpu")
    for info in (ONE, TWO):  # several processes read any CUDA device as "use the GPUs"
        with pytest.raises(UserError, match="CUDA is not available"):
            process_device("cuda:3", info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_process_takes_its_local_gpu():
    assert process_device("cuda:0", DistInfo(0, 2, 0)) == torch.device("cuda", 0)
    assert process_device("auto", DistInfo(0, 2, 0)) == torch.device("cuda", 0)


def test_exit_codes_follow_the_shell():
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


def test_the_commands_and_workers_share_one_logging_setup():
    from ddpmkit.cli import setup_logging as from_cli
    from ddpmkit.runtime import distributed
    from ddpmkit.runtime.logs import setup_logging

    assert from_cli is setup_logging
    assert distributed.spawn.__defaults__[-1] is setup_logging
