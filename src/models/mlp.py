"""The MLP under study and the LightningModule that trains it."""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt, restricted_number_type
from torch import nn
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from src.names import TRAIN_ACC, TRAIN_LOSS, metric

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu"]
Init = Literal["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "normal"]
DropoutProb = restricted_number_type("DropoutProb", float, [(">=", 0.0), ("<", 1.0)])
NumClasses = restricted_number_type("NumClasses", int, (">=", 2))

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
}
# The gain nn.init.calculate_gain knows for each activation; the rest use 1.
_GAIN_NAME = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "leaky_relu": "leaky_relu", "selu": "selu"}


def hidden_widths(depth: int, width: int | list[int]) -> list[int]:
    """The hidden layer widths of an MLP with ``depth`` Linear layers.

    >>> hidden_widths(3, 10)
    [10, 10]
    >>> hidden_widths(3, [256, 128])
    [256, 128]
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (the number of Linear layers), got {depth!r}")
    widths = [width] * (depth - 1) if isinstance(width, int) else list(width)
    if len(widths) != depth - 1:
        raise ValueError(
            f"width lists the hidden layers, so it needs depth - 1 = {depth - 1} entries, got {len(widths)}"
        )
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"width must be a positive integer or a list of them, got {width!r}")
    return widths


def init_linear_(layer: nn.Linear, init: str, activation: str) -> None:
    """Re-initialise one Linear layer in place; biases start at zero unless ``init`` is ``default``."""
    if init == "default":
        return
    gain = nn.init.calculate_gain(_GAIN_NAME.get(activation, "linear"))
    if init == "xavier_uniform":
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    elif init == "xavier_normal":
        nn.init.xavier_normal_(layer.weight, gain=gain)
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    elif init == "kaiming_normal":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    elif init == "normal":
        nn.init.normal_(layer.weight, mean=0.0, std=1.0)
    else:
        raise ValueError(f"init must be one of {', '.join(Init.__args__)}, got {init!r}")
    nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """A plain MLP: ``depth`` Linear layers named ``layers.0 .. layers.{depth-1}``.

    Between two Linear layers: optional ``BatchNorm1d`` (``norms.i``), the activation, optional
    dropout. The last layer returns logits. The Linear layers are registered first, so iterating
    ``named_parameters()`` walks them from the input to the output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        width: int | list[int],
        activation: str = "relu",
        init: str = "default",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        sizes = [in_features, *hidden_widths(depth, width), out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in sizes[1:-1]) if batch_norm else None
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for layer in self.layers:
            init_linear_(layer, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = self.dropout(self.activation(x))
        return self.layers[-1](x)


class MLPClassifier(L.LightningModule):
    """An MLP classifier of configurable depth, width, activation and initialisation.

    Two classes get one output logit and ``BCEWithLogitsLoss``; more get one logit per class and
    ``CrossEntropyLoss``. The optimizer and LR scheduler come from LightningCLI's ``optimizer:`` /
    ``lr_scheduler:`` sections; used from plain Python, the model trains with SGD at lr 0.1.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` per epoch.
    When the validation batches carry the true probability of class 1 (a third tensor, as the dnnex
    data does), it also logs ``val/prob_mae``, the mean |predicted - true| probability.

    Args:
        in_features: Input features. Under LightningCLI it is taken from the datamodule.
        num_classes: Classes (>= 2). Under LightningCLI it is taken from the datamodule.
        depth: Number of Linear layers (>= 1); ``depth - 1`` hidden layers.
        width: Width of every hidden layer, or a list of the ``depth - 1`` hidden widths.
        activation: Activation after each hidden layer.
        init: Weight initialisation of the Linear layers; ``default`` keeps PyTorch's.
            Xavier uses the activation's gain, Kaiming assumes ReLU, ``normal`` is N(0, 1).
        dropout: Dropout probability after each hidden activation, in [0, 1).
        batch_norm: Put ``BatchNorm1d`` between each hidden Linear layer and its activation.

    Example::

        model = MLPClassifier(in_features=2, num_classes=2, depth=7, width=10, activation="sigmoid")
        L.Trainer(max_epochs=10).fit(model, datamodule=Toy2DDataModule())
    """

    def __init__(
        self,
        in_features: PositiveInt = 2,
        num_classes: NumClasses = 2,
        depth: PositiveInt = 7,
        width: PositiveInt | list[PositiveInt] = 10,
        activation: Activation = "sigmoid",
        init: Init = "default",
        dropout: DropoutProb = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        self.save_hyperparameters()
        self.binary = num_classes == 2
        self.net = MLP(
            in_features,
            1 if self.binary else num_classes,
            depth,
            width,
            activation=activation,
            init=init,
            dropout=dropout,
            batch_norm=batch_norm,
        )
        self.loss_fn = nn.BCEWithLogitsLoss() if self.binary else nn.CrossEntropyLoss()
        metric = BinaryAccuracy if self.binary else MulticlassAccuracy
        # validate_args=False: the model's own outputs need no checks, and the checks synchronise a GPU.
        kwargs = {"validate_args": False} | ({} if self.binary else {"num_classes": num_classes, "average": "micro"})
        self.val_acc, self.test_acc = (metric(**kwargs) for _ in range(2))
        # The train metrics are two running sums on the device (the loss over samples, the correct
        # predictions) and a sample count, logged once per epoch: see training_step.
        self._train_sums: torch.Tensor | None = None
        self._train_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: shape ``(N,)`` for two classes, ``(N, num_classes)`` otherwise."""
        logits = self.net(x)
        return logits.squeeze(-1) if self.binary else logits

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """P(class 1) of shape ``(N,)`` for two classes, class probabilities ``(N, C)`` otherwise."""
        logits = self(x)
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=-1)

    def _logits_and_loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch[0])
        y = batch[1]
        return logits, self.loss_fn(logits, y.float() if self.binary else y)

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_count = None, 0

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        logits, loss = self._logits_and_loss(batch)
        n = len(logits)
        with torch.no_grad():
            predicted = logits > 0 if self.binary else logits.argmax(dim=-1)
            sums = torch.stack([loss.detach() * n, (predicted == batch[1]).sum().to(loss.dtype)])
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        self._train_count += n
        # One self.log per metric and epoch, at its last batch: a self.log costs ~0.15 ms in
        # Lightning (and a torchmetrics update ~0.1 ms), which per step would add ~15% to a 2 ms
        # MNIST step. The values are the epoch's means over samples, what per-step logging with
        # on_epoch=True gives (batch_size carries the weight, also across DDP ranks), and they are
        # in trainer.callback_metrics by the callbacks' on_train_epoch_end. (No Trainer: a plain call.)
        if self._trainer is None or self._trainer.is_last_batch:
            self._log_train_metrics()
        return loss

    def on_train_epoch_end(self) -> None:
        # An epoch cut short (max_steps, a callback's should_stop) never reached its last batch.
        if self._train_count:
            self._log_train_metrics()

    def _log_train_metrics(self) -> None:
        loss, acc = self._train_sums / self._train_count
        kwargs = {"on_step": False, "on_epoch": True, "prog_bar": True, "batch_size": self._train_count}
        self.log(TRAIN_LOSS, loss, sync_dist=True, **kwargs)
        self.log(TRAIN_ACC, acc, sync_dist=True, **kwargs)
        self._train_sums, self._train_count = None, 0

    def _evaluate(self, batch: tuple[torch.Tensor, ...], stage: str, accuracy) -> None:
        logits, loss = self._logits_and_loss(batch)
        accuracy.update(logits, batch[1])
        self.log(metric(stage, "loss"), loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(metric(stage, "acc"), accuracy, on_step=False, on_epoch=True, prog_bar=True)
        if len(batch) > 2 and self.binary:
            mae = (torch.sigmoid(logits) - batch[2]).abs().mean()
            self.log(metric(stage, "prob_mae"), mae, on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self.predict_proba(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # LightningCLI replaces this with the optimizer from the config.
        return torch.optim.SGD(self.parameters(), lr=0.1)
