"""Datasets for tsquant: IDX (MNIST/Fashion-MNIST), CIFAR-10, ImageFolder/Imagenette.

Everything is decoded once into uint8 NHWC arrays cached under $TSQUANT_CACHE
(default ~/.cache/tsquant) and served by a deterministic, resumable BatchLoader.
"""

from .cache import cache_dir, clear_cache, extract_tarball
from .cifar import CIFAR10_CLASSES, load_cifar10
from .datasets import (
    DATASETS,
    ArrayDataset,
    BatchLoader,
    DatasetInfo,
    dataset_info,
    load_dataset,
)
from .errors import DataError
from .idx import load_idx_split, read_idx
from .imagefolder import load_imagefolder
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    build_transform,
    center_crop,
    normalize,
    random_crop,
    random_hflip,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "BatchLoader",
    "DataError",
    "DatasetInfo",
    "build_transform",
    "cache_dir",
    "center_crop",
    "clear_cache",
    "dataset_info",
    "extract_tarball",
    "load_cifar10",
    "load_dataset",
    "load_idx_split",
    "load_imagefolder",
    "normalize",
    "random_crop",
    "random_hflip",
    "read_idx",
]
