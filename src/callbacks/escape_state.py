"""What a checkpoint keeps of :class:`~.escape.PlateauEscape`'s walk through its policy."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

from .events import Action

# what a checkpoint keeps of the policy's walk, besides the actions applied ("spent") and their history
STATE = (
    "spent_by", "lr_scale", "withdrawn", "trust_ratio", "raised_at", "raised_step", "failed", "keep_kicks",
    "said_spent", "fruitless", "redraws", "worked", "_snapshot", "_safe", "_pending", "_own", "_first",
    "_origin",
)  # fmt: skip


class CheckpointedWalk:
    """The escape's ``state_dict`` and ``load_state_dict`` (Lightning's callback state): with the snapshot,
    an action on probation can still be rolled back after a resume; a checkpoint from before a setting
    existed keeps its default."""

    applied: int
    history: list[Action]
    spent_by: dict[str, int]

    def state_dict(self) -> dict[str, Any]:
        state = {name.lstrip("_"): getattr(self, name) for name in STATE}
        return state | {"spent": self.applied, "history": [asdict(a) for a in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in STATE:
            setattr(self, name, copy.deepcopy(state_dict.get(name.lstrip("_"), getattr(self, name))))
        if "spent_by" not in state_dict:  # from before the lists were counted apart
            self.spent_by = {"any": state_dict["spent"]}
        self.history = [Action(**record) for record in state_dict["history"]]
        self.applied = state_dict["spent"]
