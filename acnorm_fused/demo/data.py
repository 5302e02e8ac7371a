"""The two real brain-MRI domains of the finetuning study, found on disk and
resampled to one grid.

- Source: the ICBM152 2009a nonlinear symmetric T1 template with its grey- and
  white-matter probability maps, shipped inside the ``nilearn`` wheel; the task
  is 3-class tissue segmentation (background, grey matter, white matter: the
  larger probability, where it exceeds 0.5).
- Target: the Colin27 single-subject T1 (``ch2.nii.gz``) with the AAL atlas
  drawn on the same brain (``aal.nii.gz``, names in ``aal.nii.txt``), from
  Debian's ``mricron-data`` package; its 116 regions are grouped into lobes for
  a few-shot segmentation.

Both are in MNI space; they are resampled (linear for intensities, nearest for
labels) to a common 2 mm grid whose axial slices the U-Net sees.

An unrelated modality for the transferability check: the two uncompressed
computed-radiography images (``RG1_UNCI.dcm``, ``RG3_UNCI.dcm``) of the
``pydicom-data`` package, read with ``pydicom`` and cut into crops the size of
the brain slices. Nothing of the images is stored in this project.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MRICRON = Path(os.environ.get("ACNORM_MRICRON_TEMPLATES", "/usr/share/mricron/templates"))
ICBM_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# The common grid: 2 mm voxels, (x, y, z) from the origin below, in MNI mm.
# Sizes are multiples of 4 for the U-Net's two poolings.
VOXEL_MM = 2.0
GRID_SHAPE = (88, 108, 88)
GRID_ORIGIN = (-88.0, -126.0, -72.0)

SOURCE_CLASSES = ("background", "grey matter", "white matter")
# AAL region name prefixes per lobe (the hemisphere suffix _L/_R is dropped).
LOBES = {
    "frontal": ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
                "Paracentral_Lobule"),
    "parietal": ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Temporal_", "Heschl", "Fusiform"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital_"),
    "insula and cingulum": ("Insula", "Cingulum_"),
    "deep grey": ("Hippocampus", "ParaHippocampal", "Amygdala", "Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum_", "Vermis_"),
}
TARGET_CLASSES = ("background", *LOBES)


# Radiographs of pydicom-data (an unrelated modality) and the factor by which
# they are shrunk before cutting crops, so a crop spans a few centimetres of
# anatomy as a brain slice does.
XRAY_FILES = ("RG1_UNCI.dcm", "RG3_UNCI.dcm")
XRAY_SHRINK = 4


class MissingData(RuntimeError):
    """The images are not installed; the message says what to install."""


@dataclass
class Domain:
    """A T1 image and its labels on the common grid: ``image`` (float32,
    normalised to mean 0 and std 1 inside the head) and ``labels`` (int64),
    both shaped :data:`GRID_SHAPE` as (x, y, z)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _nibabel():
    if importlib.util.find_spec("scipy") is None:
        raise MissingData("the demo needs scipy: pip install 'acnorm-fused[demo]'")
    try:
        import nibabel
    except ImportError:
        raise MissingData("the demo needs nibabel: pip install 'acnorm-fused[demo]'") from None
    return nibabel


def _icbm_folder() -> Path:
    try:
        import nilearn
    except ImportError:
        raise MissingData("the source domain (ICBM152 2009a) comes with nilearn: "
                          "pip install 'acnorm-fused[demo]'") from None
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in ICBM_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MissingData(f"this nilearn lacks {', '.join(missing)} in {folder}; reinstall nilearn from its wheel")
    return folder


def _mricron_file(name: str) -> Path:
    path = MRICRON / name
    if not path.is_file():
        raise MissingData(
            f"the target domain (Colin27 and the AAL atlas) is missing: {path} not found. On Debian or "
            "Ubuntu: sudo apt-get install mricron-data (or set ACNORM_MRICRON_TEMPLATES to its templates folder)")
    return path


def _resample(path: Path, order: int) -> np.ndarray:
    """The image at ``path`` on the common grid (world coordinates through its affine)."""
    nibabel = _nibabel()  # first: says what to install when scipy or nibabel is missing
    from scipy.ndimage import map_coordinates

    image = nibabel.load(str(path))
    axes = [GRID_ORIGIN[a] + VOXEL_MM * np.arange(GRID_SHAPE[a]) for a in range(3)]
    world = np.stack([*np.meshgrid(*axes, indexing="ij"), np.ones(GRID_SHAPE)], axis=0).reshape(4, -1)
    voxels = (np.linalg.inv(image.affine) @ world)[:3]
    data = np.asarray(image.dataobj, dtype=np.float32)
    return map_coordinates(data, voxels, order=order, mode="constant", cval=0.0).reshape(GRID_SHAPE)


def _normalise(image: np.ndarray) -> np.ndarray:
    head = image > 0.1 * image.max()
    return ((image - image[head].mean()) / image[head].std()).astype(np.float32)


def load_source() -> Domain:
    """ICBM152 2009a T1 and its tissue classes."""
    folder = _icbm_folder()
    t1, gm, wm = (_resample(folder / ICBM_FILES[k], order=1) for k in ("t1", "gm", "wm"))
    labels = np.where((gm > 0.5) & (gm >= wm), 1, np.where(wm > 0.5, 2, 0)).astype(np.int64)
    return Domain("ICBM152 2009a tissue", _normalise(t1), labels, SOURCE_CLASSES)


def lobe_of_region(name: str) -> int:
    """Target class of an AAL region name (0 for none)."""
    base = name[:-2] if name.endswith(("_L", "_R")) else name
    for index, prefixes in enumerate(LOBES.values(), 1):
        if base.startswith(prefixes):
            return index
    return 0


def load_target() -> Domain:
    """Colin27 T1 and the AAL regions grouped into lobes."""
    t1 = _resample(_mricron_file("ch2.nii.gz"), order=1)
    aal = _resample(_mricron_file("aal.nii.gz"), order=0).astype(np.int64)
    lookup = np.zeros(int(aal.max()) + 1, dtype=np.int64)
    for line in _mricron_file("aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) < lookup.size:
            lookup[int(parts[0])] = lobe_of_region(parts[1])
    return Domain("Colin27 AAL lobes", _normalise(t1), lookup[aal], TARGET_CLASSES)


def _xray_folder() -> Path:
    spec = importlib.util.find_spec("data_store")
    if importlib.util.find_spec("pydicom") is None or spec is None or not spec.submodule_search_locations:
        raise MissingData("the unrelated modality (radiographs) comes with pydicom and pydicom-data: "
                          "pip install 'acnorm-fused[demo]'")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    missing = [name for name in XRAY_FILES if not (folder / name).is_file()]
    if missing:
        raise MissingData(f"pydicom-data lacks {', '.join(missing)} in {folder}; reinstall pydicom-data")
    return folder


def check_available() -> None:
    """Raise :class:`MissingData` for the first package or dataset the study lacks,
    so that a missing one is said before any run, not after the others."""
    _nibabel()
    _icbm_folder()
    for name in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt"):
        _mricron_file(name)
    _xray_folder()


def load_xray_crops(count: int, seed: int = 0) -> np.ndarray:
    """``count`` crops (float32, shaped like an axial slice of the grid, each
    normalised to mean 0 and std 1) from the radiographs, shrunk by
    :data:`XRAY_SHRINK`, at random places (``seed``) spread over both images."""
    folder = _xray_folder()  # first: says what to install when pydicom is missing
    import pydicom

    height, width = GRID_SHAPE[0], GRID_SHAPE[1]
    generator = np.random.default_rng(seed)
    crops = []
    for index, name in enumerate(XRAY_FILES):
        image = pydicom.dcmread(folder / name).pixel_array.astype(np.float32)
        rows, cols = (size // XRAY_SHRINK * XRAY_SHRINK for size in image.shape)
        image = image[:rows, :cols].reshape(rows // XRAY_SHRINK, XRAY_SHRINK, cols // XRAY_SHRINK,
                                            XRAY_SHRINK).mean(axis=(1, 3))
        for _ in range(count // len(XRAY_FILES) + (index < count % len(XRAY_FILES))):
            top = generator.integers(0, image.shape[0] - height + 1)
            left = generator.integers(0, image.shape[1] - width + 1)
            crop = image[top:top + height, left:left + width]
            crops.append((crop - crop.mean()) / max(float(crop.std()), 1e-6))
    return np.stack(crops).astype(np.float32)
