"""``python -m dvpo_lightning sweep FILE``: W&B sweep files, checked (:mod:`.spec`,
:mod:`.schema`), run locally (:mod:`.run`) and summarised (:mod:`.report`)."""

from dvpo_lightning.commands.sweep.run import main

__all__ = ["main"]
