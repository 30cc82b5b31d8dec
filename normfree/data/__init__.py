"""Data: fastai DataLoaders for the built-in and users' image data, and the ``--data`` registry of kinds."""
from .loaders import (
    FASHION_MNIST_CLASSES,
    csv_dataloaders,
    digits_dataloaders,
    fashion_mnist_dataloaders,
    image_folder_dataloaders,
    medmnist_dataloaders,
    read_idx,
    subset_dataloaders,
    write_digits_image_folder,
)
from .registry import DataSpec, parse_data_spec

__all__ = ["FASHION_MNIST_CLASSES", "DataSpec", "csv_dataloaders", "digits_dataloaders", "fashion_mnist_dataloaders",
           "image_folder_dataloaders", "medmnist_dataloaders", "parse_data_spec", "read_idx", "subset_dataloaders",
           "write_digits_image_folder"]
