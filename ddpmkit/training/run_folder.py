"""A training run's folder, kept safe: nothing is written until the run is known to start.

`<chkpt-dir>/<exp-name>/` holds `config.json`, `log.jsonl`, `tensorboard/` and the checkpoints
(`CheckpointFiles`). Before any work:
- `preflight` refuses a folder that cannot be created or written (one line, no writes);
- `resume_point` finds the checkpoint to continue from: `--chkpt-path`, else the file with the
  highest step (damaged ones are reported and skipped; nothing restarts silently from zero);
- `check_new_run` refuses a new run in a folder holding another run's checkpoints, unless
  `overwrite`.
Only after the first update succeeded (`on_run_start`) does the main process write: it removes
the temp files of interrupted saves, sets damaged checkpoints aside, deletes the replaced run's
files (with `overwrite`), drops the log records a resumed run will redo, and writes
`config.json`. So a command that fails before that leaves the folder exactly as it was.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Callable

from ddpmkit.checkpoints.files import (
    CheckpointFiles,
    ResumePoint,
    load_checkpoint,
    newest_checkpoint,
)
from ddpmkit.config import dump_json
from ddpmkit.errors import UserError
from ddpmkit.training.trainer import Callback, Trainer
from ddpmkit.utils.io import check_writable_folder

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
DAMAGED_SUFFIX = ".damaged"
# Sample grids the trainer writes into the image folder: <epoch>.png and step<N>.png.
_GRID_RE = re.compile(r"^(step)?\d+\.png$")


class RunFolder(Callback):
    """The files of one run (see the module doc). `config` is written as config.json."""

    def __init__(self, folder: str, prefix: str, config: dict[str, Any],
                 image_folder: str | None = None, config_name: str = CONFIG_NAME,
                 log_name: str = LOG_NAME, image_pattern: re.Pattern = _GRID_RE,
                 elsewhere: str = "another --exp-name / --chkpt-dir",
                 start_fresh: str = "--auto-resume to start fresh when there is none"):
        self.folder = folder
        # The command's own flags for "write somewhere else" and "start from zero".
        self.elsewhere, self.start_fresh = elsewhere, start_fresh
        self.files = CheckpointFiles(folder, prefix)
        self.config = config
        self.image_folder = image_folder
        self.config_name, self.log_name, self.image_pattern = config_name, log_name, image_pattern
        self.overwrite = False
        self.resumed: ResumePoint | None = None
        self.committed = False

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, self.log_name)

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.folder, TENSORBOARD_DIR)

    def preflight(self, checkpoint_bytes: int = 0) -> None:
        """Refuse folders that cannot be written, or lack `checkpoint_bytes` of free space."""
        check_writable_folder(self.folder, "checkpoint folder", checkpoint_bytes)
        if self.image_folder:
            check_writable_folder(self.image_folder, "image folder")

    def resume_point(self, path: str | None) -> ResumePoint | None:
        """The state to continue from: `path`, else the newest good checkpoint of the folder
        (None when it holds none)."""
        if path:
            self.resumed = ResumePoint(path, load_checkpoint(path, map_location="cpu"), [])
        else:
            self.resumed = newest_checkpoint(self.files.all())
        if self.resumed is not None:
            for damaged, reason in self.resumed.damaged:
                logger.warning("skipping damaged checkpoint %s (%s); resuming from %s",
                               damaged, reason, self.resumed.path)
        return self.resumed

    def prepare(self, resume: bool, chkpt_path: str | None, overwrite: bool,
                check_state: Callable[[dict[str, Any], str], None],
                auto_resume: bool = False) -> None:
        """The rules every training command follows: `resume` continues from a checkpoint
        (there must be one; `auto_resume` starts fresh when there is none) checked by
        `check_state(state, path)`; a new run may not replace saved progress unless
        `overwrite`."""
        if not (resume or auto_resume):
            self.check_new_run(overwrite)
            return
        point = self.resume_point(chkpt_path)
        if point is not None:
            check_state(point.state, point.path)
        elif resume:
            raise UserError(f"--resume: no checkpoint found in {self.folder} (files "
                            f"{self.files.prefix}_*.pt); pass --chkpt-path FILE, or "
                            f"{self.start_fresh}")
        else:
            logger.warning("no checkpoint of this run yet in %s: starting from step 0",
                           self.folder)
            self.check_new_run(overwrite=True)

    def holds_config(self, config: dict[str, Any]) -> bool:
        """Whether the folder's config.json is `config` (the run that wrote it is this one)."""
        path = os.path.join(self.folder, self.config_name)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f) == json.loads(json.dumps(config))
        except (OSError, ValueError):
            return False

    def check_new_run(self, overwrite: bool) -> None:
        """A new run may not mix its checkpoints with another run's."""
        existing = self.files.all()
        if existing and not overwrite:
            names = ", ".join(os.path.basename(p) for p in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise UserError(
                f"{self.folder} already holds another run's checkpoints ({names}{more}): pass "
                "--resume to continue that run, --overwrite to replace it, or "
                f"{self.elsewhere}")
        self.overwrite = overwrite and bool(existing)

    def on_run_start(self, trainer: Trainer) -> None:
        if trainer.is_main and not self.committed:
            self.commit(trainer)
        self.committed = True

    def commit(self, trainer: Trainer) -> None:
        """The run has started: tidy the folder and record the config (main process)."""
        os.makedirs(self.folder, exist_ok=True)
        if self.image_folder:
            os.makedirs(self.image_folder, exist_ok=True)
        for path in self.files.stale_temp_files((self.config_name, self.log_name)):
            os.unlink(path)
            logger.info("removed %s, left by an interrupted save", path)
        if self.overwrite:
            self._remove_replaced_run()
        if self.resumed is not None:
            for path, _ in self.resumed.damaged:
                if os.path.exists(path):
                    os.replace(path, path + DAMAGED_SUFFIX)
                    logger.warning("set %s aside as %s", path, path + DAMAGED_SUFFIX)
            dropped = trainer.truncate_log_after(self.resumed.state["step"])
            if dropped:
                logger.info("log.jsonl: dropped %d record(s) after step %d, which this run "
                            "redoes", dropped, self.resumed.state["step"])
        dump_json(self.config, os.path.join(self.folder, self.config_name))

    def _remove_replaced_run(self) -> None:
        doomed = self.files.all() + [self.log_path]
        doomed += glob.glob(os.path.join(self.tensorboard_dir, "events.out.tfevents.*"))
        if self.image_folder and os.path.isdir(self.image_folder):
            doomed += [os.path.join(self.image_folder, n) for n in os.listdir(self.image_folder)
                       if self.image_pattern.match(n)]
        for path in doomed:
            if os.path.isfile(path):
                os.unlink(path)
        logger.warning("replacing the previous run in %s: removed its checkpoints, log and "
                       "images", self.folder)
