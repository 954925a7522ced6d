"""Builders for data test fixtures in the formats of the real sources (Hub parquet, CIFAR-N .pt).

Imported by tests/test_data_*.py; nothing here touches the network.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from ..testing_utils import SHARED_DATA

REAL_CIFAR100N_LABELS = SHARED_DATA / "CIFAR-100_human.pt"

CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch cra crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm"
).split()

CIFAR100_COARSE_NAMES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things "
    "large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals "
    "non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2"
).split()

CIFAR100_FEATURES = Features(
    {
        "img": Image(),
        "fine_label": ClassLabel(names=CIFAR100_FINE_NAMES),
        "coarse_label": ClassLabel(names=CIFAR100_COARSE_NAMES),
    }
)
"""The features of uoft-cs/cifar100 on the Hub."""


def write_cifar100_folder(root: Path, train_fine: np.ndarray, test_fine: np.ndarray, *, seed: int = 0) -> Path:
    """Write a uoft-cs/cifar100-format folder (data/{train,test}-00000-of-00001.parquet) of random 32x32 images."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, fine in (("train", train_fine), ("test", test_fine)):
        images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in fine]
        rows = {
            "img": images,
            "fine_label": [int(label) for label in fine],
            "coarse_label": [int(label) % 20 for label in fine],
        }
        Dataset.from_dict(rows, features=CIFAR100_FEATURES).to_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet"
        )
    return root


def save_like_cifar_n(labels: dict[str, np.ndarray], path: Path) -> Path:
    """`torch.save` numpy arrays as the CIFAR-N release did, under numpy 1's global names.

    numpy 2 pickles arrays through ``numpy._core.multiarray._reconstruct``; the released files
    (written with numpy 1) name ``numpy.core.multiarray._reconstruct``. Protocol-2 pickles spell
    globals out as text lines, so renaming is a byte replacement in the archive's data.pkl.
    """
    buffer = io.BytesIO()
    torch.save(labels, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for entry in source.infolist():
            data = source.read(entry.filename)
            if entry.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            target.writestr(entry, data)
    return path


def cifar100n_labels(clean_fine: np.ndarray, *, noise_rate: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A CIFAR-100_human.pt-shaped dict for `clean_fine`, with about `noise_rate` of labels changed."""
    rng = np.random.default_rng(seed)
    clean_fine = np.asarray(clean_fine, dtype=np.int64)
    noisy = np.where(
        rng.random(len(clean_fine)) < noise_rate, (clean_fine + rng.integers(1, 100, len(clean_fine))) % 100, clean_fine
    )
    return {
        "clean_label": clean_fine,
        "noisy_label": noisy.astype(np.int64),
        "noisy_coarse_label": noisy % 20,
        "clean_coarse_label": clean_fine % 20,
    }


def flip_bit(source: Path, target: Path, *, member: str = "data.pkl", fraction: float = 0.5) -> Path:
    """Copy the `torch.save` archive `source` to `target` with one bit flipped inside one member's data.

    The flipped byte sits at `fraction` of the stored bytes of the first zip member whose name ends
    with `member` (torch stores members uncompressed, so these are the member's own bytes). The zip
    headers stay intact: only the member's CRC-32 can tell the copy from the original.
    """
    data = bytearray(Path(source).read_bytes())
    with zipfile.ZipFile(source) as archive:
        entry = next(info for info in archive.infolist() if info.filename.endswith(member))
    assert entry.compress_type == zipfile.ZIP_STORED, "flip_bit expects uncompressed members, as torch.save writes"
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    data[start + int(fraction * (entry.compress_size - 1))] ^= 0x10
    Path(target).write_bytes(bytes(data))
    return Path(target)
