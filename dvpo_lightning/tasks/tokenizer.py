"""A character-level tokenizer for the embedded tasks, saved in Hugging Face format.

Every printable character of the task alphabet is one token, so one wrong token is one wrong
character: the token-level structure the value model has to learn is exactly the task's.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per character of ``alphabet`` after four special tokens.

    Args:
        alphabet: the characters the task uses; duplicates are ignored, order kept.

    Returns:
        A fast tokenizer with ``pad``/``bos``/``eos``/``unk`` set, no chat template, and
        ``padding_side="left"`` (generation pads prompts on the left).
    """
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def save_char_tokenizer(alphabet: str, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer for ``alphabet`` and ``save_pretrained`` it into ``out_dir``."""
    tok = build_char_tokenizer(alphabet)
    tok.save_pretrained(str(out_dir))
    return tok
