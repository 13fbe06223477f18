from src.data.in_memory import InMemoryDataModule, InMemoryDataset
from src.data.toy2d import Toy2DDataModule

__all__ = ["InMemoryDataModule", "InMemoryDataset", "Toy2DDataModule"]
