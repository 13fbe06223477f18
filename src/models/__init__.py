from src.models.mlp import MLP, MLPClassifier

__all__ = ["MLP", "MLPClassifier"]
