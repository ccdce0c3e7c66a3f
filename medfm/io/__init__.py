"""Volumes and datasets: Volume (array + affine), NIfTI, PNG, DICOM series, nnU-Net v2 raw sets.

The axis order used everywhere in medfm is documented once, in ``medfm.io.volume``. Every
reader estimates the memory a file needs from its header and refuses what the machine cannot
hold (`check_memory`) before allocating it.

Start with `load_volume` / `save_volume` (a file by its name), `iter_dataset` (read an nnU-Net
folder case by case) and `write_dataset` (write one from (case, image, label) items).
"""

from medfm.io.atomic import (
    atomic_folder,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    remove_temp_files,
)
from medfm.io.dataset import write_dataset
from medfm.io.dicom import read_dicom_series
from medfm.io.files import load_volume, save_volume
from medfm.io.lock import LOCK_NAME, RunLock
from medfm.io.memory import available_memory, check_memory
from medfm.io.nifti import read_nifti, write_nifti
from medfm.io.nnunet import (
    DatasetJson,
    case_complete,
    case_paths,
    iter_dataset,
    list_cases,
    read_dataset_json,
    write_case,
    write_dataset_json,
)
from medfm.io.paths import check_new, check_outputs, check_writable
from medfm.io.png import read_image, read_png, write_png
from medfm.io.volume import Volume, resample_volume

__all__ = [
    "LOCK_NAME",
    "DatasetJson",
    "RunLock",
    "Volume",
    "atomic_folder",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "available_memory",
    "case_complete",
    "case_paths",
    "check_memory",
    "check_new",
    "check_outputs",
    "check_writable",
    "iter_dataset",
    "list_cases",
    "load_volume",
    "read_dataset_json",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_png",
    "remove_temp_files",
    "resample_volume",
    "save_volume",
    "write_case",
    "write_dataset",
    "write_dataset_json",
    "write_nifti",
    "write_png",
]
