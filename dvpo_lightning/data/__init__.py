"""Data: reading local files into canonical, validated examples (and, later, DataModules)."""

from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.formats import load_examples, pairs_to_scored, render_messages_plain
from dvpo_lightning.data.readers import read_records, read_rows

__all__ = [
    "DataFormatError",
    "load_examples",
    "pairs_to_scored",
    "read_records",
    "read_rows",
    "render_messages_plain",
]
