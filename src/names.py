"""Every name that a writer and a reader must agree on, defined once. No torch or Lightning import.

The model logs the metrics below; the callbacks' own names (events file, tag prefixes) are
defined in :mod:`src.callbacks.names`, so that the callbacks folder stays copyable on its own,
and are re-exported here.
"""

from src.callbacks.names import (  # noqa: F401  (re-exported)
    DEAD,
    EVENTS_FILE,
    FINAL,
    FINAL_EPOCHS,
    FINAL_STALLS,
    GRAD_NORM,
    GRAD_NORM_FIRST_TO_LAST,
    GRAD_NORM_TOTAL,
    OPTIM_LR,
    OPTIM_MOMENTUM,
    PLATEAU,
    PLATEAU_ACTIONS_TEXT,
    PLATEAU_EVENTS_TEXT,
    SATURATED,
    UPDATE_RATIO_LOG10,
)

TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
VAL_PROB_MAE = "val/prob_mae"  # mean |predicted - true| P(class 1), when the data knows the true one
METRICS = (TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, VAL_PROB_MAE)  # what summaries and the report show


def metric(stage: str, name: str) -> str:
    """``metric("test", "acc") == "test/acc"``: the model's metric of a stage (train, val, test)."""
    return f"{stage}/{name}"


DEBUG_ENV = "TEMPLATE_DEBUG"  # set it to see a traceback instead of the one-line error
