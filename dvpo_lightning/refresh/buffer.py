"""The labelled buffer: every label a semi-online run has bought, kept in its checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LabelledRow:
    """One labelled response, as the GVM trains on it.

    Attributes:
        step: the RL step whose refresh bought it.
        prompt: the raw prompt.
        response: the decoded response.
        prompt_ids: its prompt's token ids, as the policy saw them.
        response_ids: the response's token ids, as sampled.
        label: the labeller's label (score plus annotation noise).
        target: the GVM's return for it (the label, or ``chosen_return`` /
            ``rejected_return`` with ``kind: pairs``).
    """

    step: int
    prompt: object
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    label: float
    target: float


class LabelledBuffer:
    """Every labelled row so far, in the order bought; saved whole in the checkpoint (a resumed
    run trains on exactly the labels the interrupted one had)."""

    def __init__(self) -> None:
        self.rows: list[LabelledRow] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[LabelledRow]) -> None:
        self.rows.extend(rows)

    def state_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [LabelledRow(**r) for r in state.get("rows", [])]
