from src.data.dnnex import DataFileError, DnnexDataModule
from src.data.in_memory import InMemoryDataModule, InMemoryDataset
from src.data.mnist import MNISTDataModule
from src.data.toy2d import Toy2DDataModule

__all__ = [
    "DataFileError",
    "DnnexDataModule",
    "InMemoryDataModule",
    "InMemoryDataset",
    "MNISTDataModule",
    "Toy2DDataModule",
]
