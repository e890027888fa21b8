"""Dataset facts completed into a resolved image config: resolution, channels, flips and
classes come from the dataset (the registry in `data.images`, or a folder's images) where the
config file does not give them, as the reference project's files do not.

The registry and the folder scan load lazily (they need torch); the rest of the package's
config layer does not.
"""

import os
from typing import Any, Dict, List, Optional

from ddpmkit.config.schema import size_hw
from ddpmkit.errors import UserError

# A folder run's image list, in its checkpoint folder: a resumed run reads exactly these files.
IMAGE_LIST_NAME = "images.txt"
# Set by torchrun in the processes of a restarted (elastic) job, which resume.
ELASTIC_RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"


def elastic_restart() -> bool:
    """Whether torchrun restarted this job (its processes then resume the run)."""
    return int(os.environ.get(ELASTIC_RESTART_ENV, "0") or 0) > 0


def checkpoint_folder(run: Dict[str, Any]) -> str:
    """`<chkpt_dir>/<exp_name>` of a config's `run` entry."""
    return os.path.join(os.path.expanduser(run["chkpt_dir"]), run["exp_name"])


def read_image_list(folder: str) -> Optional[List[str]]:
    """The image list a folder run wrote into its checkpoint folder (None if there is none)."""
    path = os.path.join(folder, IMAGE_LIST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def complete_dataset_facts(config: Dict[str, Any],
                           run_images: Optional[List[str]] = None) -> Dict[str, Any]:
    """Fill in (in place, and return) resolution, channels, flips and classes of the config's
    dataset, and the network's input channels and classes. `run_images`: a resumed folder
    run's image list (its channels are decided from those files)."""
    from ddpmkit.data.images import DATASETS, dataset_info

    ds, model = config["dataset"], config["model"]
    channels, resolution = dataset_info(ds["name"], ds.get("resolution"))
    ds["resolution"] = resolution
    if ds["name"] == "folder":
        ds["channels"] = _folder_channels(ds, run_images)
    elif ds.get("channels") not in (None, channels):
        raise UserError(f"{ds['name']} images have {channels} channel(s); --channels "
                        f"{ds['channels']} is for --dataset folder")
    elif len(set(size_hw(resolution))) > 1:
        raise UserError(f"{ds['name']} images are square: pass one --image-size (H,W sizes are "
                        "for --dataset folder)")
    ds["channels"] = int(ds.get("channels") or channels)
    if ds.get("random_flip") is None:
        ds["random_flip"] = DATASETS[ds["name"]].random_flip
    model.setdefault("in_channels", ds["channels"])
    if model["in_channels"] != ds["channels"]:
        raise UserError(f"the config's model.in_channels ({model['in_channels']}) does not match "
                        f"the {ds['name']} images' {ds['channels']} channel(s)")
    _complete_classes(config)
    return config


def _folder_channels(ds: Dict[str, Any], run_images: Optional[List[str]]) -> int:
    """A folder's channels (--channels, else decided from its images), its undecodable files
    named (or refused with strict_images) once, here, by the main process."""
    from ddpmkit.data.folder import build_index, report_bad_files
    from ddpmkit.data.images import available_cpus, folder_channels
    from ddpmkit.runtime.distributed import env_dist_info

    root = os.path.abspath(os.path.expanduser(str(ds["root"])))
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist; pass --root pointing at a folder "
                        "of images")
    index = build_index(root, workers=available_cpus())
    if env_dist_info().is_main or ds.get("strict_images"):
        report_bad_files(index, bool(ds.get("strict_images")))
    return folder_channels(index, ds.get("channels"), run_images)


def _complete_classes(config: Dict[str, Any]) -> None:
    """A class-conditional run (train.class_cond) takes its classes from the dataset:
    model.num_classes and dataset.class_names are filled in (and must agree if given)."""
    from ddpmkit.data.images import dataset_classes

    ds, model = config["dataset"], config["model"]
    if not config["train"].get("class_cond"):
        if model.get("num_classes"):
            raise UserError(f"the config's model.num_classes ({model['num_classes']}) makes a "
                            "class-conditional network: add --class-cond (train.class_cond), "
                            "or remove the key")
        model.pop("num_classes", None)
        return
    names = dataset_classes(ds["name"], ds["root"])
    if model.get("num_classes") not in (None, len(names)):
        raise UserError(f"the config's model.num_classes ({model['num_classes']}) does not match "
                        f"the {len(names)} classes of {ds['name']}")
    if ds.get("class_names") not in (None, names):
        raise UserError(f"the config's dataset.class_names do not match the classes of "
                        f"{ds['name']} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    model["num_classes"], ds["class_names"] = len(names), names
