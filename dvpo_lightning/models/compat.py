"""Checks that a model fits the data and the policy, made from config and tokenizer files only
(cheap: no weights are loaded), so a mismatch fails before any model does.

- :func:`check_fits_context`: the longest sequence must fit the model's position embeddings.
- :func:`check_compatible`: a GVM, reward model, reference or critic must read the policy's
  token ids: the same vocabulary, and an embedding table at least as large.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from dvpo_lightning.models.loading import load_tokenizer
from dvpo_lightning.models.named import resolve_model
from dvpo_lightning.models.tiny import is_tiny, tiny_config

_RETRAIN = ("point {setting} at a {label} trained from the policy's backbone and tokenizer (stage "
            "1 with data.init_args.tokenizer = the policy's tokenizer), or retrain it")
# role → (what it is called, the fix)
ROLES = {
    "gvm": ("GVM", _RETRAIN.format(setting="model.init_args.value_model", label="GVM")),
    "reward_model": ("reward model", _RETRAIN.format(setting="model.init_args.reward_model",
                                                     label="reward model")),
    "reference": ("reference policy", "point model.init_args.reference at the SFT policy the run "
                                      "starts "
                  "from (or leave it unset: it defaults to model.init_args.policy)"),
    "critic": ("critic", _RETRAIN.format(setting="model.init_args.critic_init", label="critic")),
    "policy": ("policy", "set data.init_args.tokenizer to the policy's directory (the tokenizer "
                         "it was "
               "trained with)"),
}
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_config(model: PretrainedConfig | str | Path) -> PretrainedConfig:
    """The ``transformers`` config of a model directory (or Hub id), or of a tiny config name
    (whose vocabulary size is a placeholder: tiny models follow the tokenizer).

    Raises ``FileNotFoundError`` for a missing directory when ``HF_HUB_OFFLINE=1``."""
    if isinstance(model, PretrainedConfig):
        return model
    name = str(model)
    if is_tiny(name):
        return tiny_config(name, 1, None, None, None)
    name = resolve_model(name)
    if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model directory {name!r} does not exist (and HF_HUB_OFFLINE=1 "
                                "forbids a download). Fix: check the path, or train the stage "
                                "that writes it first")
    return AutoConfig.from_pretrained(name)


def context_length(config: PretrainedConfig) -> int | None:
    """The model's maximum sequence length (``max_position_embeddings`` or its GPT-2 style
    names), or None when the config does not say."""
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_context(max_length: int, model: PretrainedConfig | str | Path,
                       what: str = "data.init_args.max_length") -> None:
    """Raise unless sequences of ``max_length`` tokens fit the model's context.

    Args:
        max_length: the longest sequence the run can build, in tokens (e.g. ``max_length``
            of a stage-1 DataModule, or ``max_prompt_length + max_new_tokens`` in RL).
        model: a model config, a model directory or a tiny config name.
        what: the setting(s) that make ``max_length``, named in the message.

    Raises:
        ValueError: with both lengths and the fix. Positions past the context have no
            embedding: the model fails with an index error mid-run, or (rotary models)
            silently extrapolates.
    """
    config = model_config(model)
    limit = context_length(config)
    if limit is not None and max_length > limit:
        src = model if isinstance(model, (str, Path)) else type(config).__name__
        raise ValueError(
            f"{what} ({max_length} tokens) is longer than the model's context "
            f"(max_position_embeddings={limit} in {src}). Fix: set {what} to at most {limit}, "
            "or use a model with a longer context"
        )


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """First 12 hex digits of the sha256 of the tokenizer's token → id map."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _first_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str:
    va, vb = a.get_vocab(), b.get_vocab()
    def show(i: int | None) -> str:
        return "absent" if i is None else f"id {i}"

    for tok in sorted(set(va) | set(vb), key=lambda t: (va.get(t, 1 << 62), t)):
        if va.get(tok) != vb.get(tok):
            return f"token {tok!r}: {show(va.get(tok))} in the run's, {show(vb.get(tok))} here"
    return "the same tokens, other details differ"


def check_compatible(policy: str | Path | PreTrainedTokenizerBase, other: str | Path,
                     role: str) -> None:
    """Raise unless the model in ``other`` reads the policy's token ids.

    Compares, without loading weights: the tokenizers' vocabularies (token → id, and EOS)
    when ``other`` has a tokenizer of its own, and the policy tokenizer's size with the
    ``vocab_size`` of ``other``'s config (its embedding table). A larger ``vocab_size`` is
    fine (padded embedding tables are common).

    Args:
        policy: the run's tokenizer (the policy's), or a directory holding it.
        other: the directory of the GVM, reward model, reference or critic; or the policy's
            own directory with ``role="policy"`` (is ``data.tokenizer`` the one it was trained
            with?). A tiny config name is built from the tokenizer, so always fits.
        role: ``"gvm"``, ``"reward_model"``, ``"reference"``, ``"critic"`` or ``"policy"``.

    Raises:
        ValueError: naming the role, both values and the fix.
        FileNotFoundError: ``other`` does not exist.
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} is not one of {sorted(ROLES)}")
    label, fix = ROLES[role]
    if is_tiny(str(other)):
        return
    tok = policy if isinstance(policy, PreTrainedTokenizerBase) else load_tokenizer(policy)
    src = getattr(tok, "name_or_path", "") or (
        "(in memory)" if isinstance(policy, PreTrainedTokenizerBase) else str(policy))
    config = model_config(other)
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tok) > vocab_size:
        raise ValueError(
            f"the {label} in {other} has an embedding table of vocab_size={vocab_size}, smaller "
            f"than the run's tokenizer ({len(tok)} tokens, {src}): token ids >= {vocab_size} "
            f"would index past it. Fix: {fix}"
        )
    other = resolve_model(other)
    if not any((Path(other) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                     "vocab.json", "tokenizer.model")):
        return  # a bare model directory: only the size can be checked
    theirs = load_tokenizer(other)
    mine_fp, their_fp = vocab_fingerprint(tok), vocab_fingerprint(theirs)
    if mine_fp != their_fp:
        raise ValueError(
            f"the {label} in {other} was trained with another tokenizer: {len(theirs)} tokens "
            f"(vocab sha256 {their_fp}) against {len(tok)} (vocab sha256 {mine_fp}) in the "
            f"run's tokenizer {src}; {_first_difference(tok, theirs)}. The {label} would read "
            f"other text than the policy wrote. Fix: {fix}"
        )
    if tok.eos_token_id != theirs.eos_token_id:
        raise ValueError(
            f"the {label} in {other} ends sequences with EOS id {theirs.eos_token_id}, the "
            f"run's tokenizer with {tok.eos_token_id} ({src}). Fix: {fix}"
        )
