"""Data: reading local files into canonical, validated examples (:mod:`.readers`,
:mod:`.formats`), tokenizing them (:mod:`.tokenize`) and the DataModules that serve them."""

from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.formats import load_examples, pairs_to_scored, render_messages_plain
from dvpo_lightning.data.readers import read_records

__all__ = [
    "DataFormatError",
    "load_examples",
    "pairs_to_scored",
    "read_records",
    "render_messages_plain",
]
