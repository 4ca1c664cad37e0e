"""Token-level values of a frozen value model, as a table and a picture (the paper's Figure 3).

For a prompt ``x`` and a response ``y_1 … y_T`` (``y_T`` = EOS, as in training) the model gives
``u_0 … u_T`` (:func:`~dvpo_lightning.rollout.scoring.response_values`): ``u_0`` at the last
prompt token, ``u_t`` after ``y_t``. Each token ``y_t`` is shown with its value ``u_t`` and its
step ``δ_t = u_t − u_{t−1}``, the credit the GVM gives that token; the steps of a response
telescope, ``Σ_t δ_t = u_T − u_0``. Colours diverge around 0 (red < 0 < green) on one scale
``[−m, m]`` per picture, ``m = max |colour quantity|`` over every token shown.
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.data.collate import collate_prompt_response
from dvpo_lightning.data.formats import render_messages_plain
from dvpo_lightning.data.tokenize import encode_prompt, encode_response
from dvpo_lightning.rollout.scoring import response_values

COLOR_BY = ("delta", "value")
TABLE_COLUMNS = ("example", "response", "position", "token", "token_id", "value", "delta",
                 "prompt_value")
_VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "↵", " ": "·"}
_RED, _GREEN = (215, 48, 39), (26, 152, 80)


@dataclass
class ResponseValues:
    """One response's token values; list index ``t − 1`` holds token ``y_t``.

    Attributes:
        label: the response's name in the picture (``chosen``, ``rejected``, ``response 1``).
        text: the response as given (without EOS).
        prompt_value: ``u_0``, the value at the last prompt token.
        token_ids: ``y_1 … y_T``, EOS last.
        tokens: each token's text, readable (whitespace as ``·⏎⇥``, special tokens by name).
        values: ``u_1 … u_T``.
        deltas: ``δ_t = u_t − u_{t−1}``.
    """

    label: str
    text: str
    prompt_value: float
    token_ids: list[int]
    tokens: list[str]
    values: list[float]
    deltas: list[float]


@dataclass
class ExampleValues:
    """One prompt (as plain text) and its responses, shown side by side."""

    prompt: str
    responses: list[ResponseValues]


def token_deltas(values: Tensor, response_mask: Tensor) -> Tensor:
    """``δ_t = u_t − u_{t−1}``, ``t = 1 … T``: ``(B, T)`` from ``values (B, T + 1)``.

    Args:
        values: ``u_0 … u_T`` per row, ``(B, T + 1) float``.
        response_mask: ``(B, T) bool``, True on real response tokens; padding gets ``δ = 0``.
    """
    return (values[:, 1:] - values[:, :-1]).masked_fill(~response_mask, 0.0)


def visible(piece: str) -> str:
    """``piece`` with spaces, newlines, tabs and carriage returns drawn as ``·``, ``⏎``, ``⇥``,
    ``↵``."""
    return "".join(_VISIBLE.get(c, c) for c in piece)


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """The readable text of each id: special tokens by name (``<eos>``, ``</s>``), others by
    the text they add when decoding left to right (keeps the leading spaces that decoding one
    token alone drops), whitespace made :func:`visible`.

    Args:
        tokenizer: the tokenizer the ids come from.
        ids: token ids, e.g. ``y_1 … y_T``.
    """
    special = set(tokenizer.all_special_ids)
    pieces, kept, prev = [], [], ""
    for i in ids:
        if i in special:
            pieces.append(tokenizer.convert_ids_to_tokens(i))
            continue
        kept.append(i)
        text = tokenizer.decode(kept, clean_up_tokenization_spaces=False)
        piece = text[len(prev):] if text.startswith(prev) else tokenizer.decode([i])
        prev = text
        pieces.append(visible(piece) or tokenizer.convert_ids_to_tokens(i))
    return pieces


def _prompt_text(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else render_messages_plain(prompt)


@torch.no_grad()
def token_values(value_model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 examples: list[dict], chat_template: bool = True,
                 batch_size: int = 16) -> list[ExampleValues]:
    """Per-token values and steps of every response, encoded and aligned exactly as in training.

    Prompts go through :func:`encode_prompt` and responses through :func:`encode_response`
    (tokens + EOS), batched in the shared layout (:func:`collate_prompt_response`) and scored
    by :func:`response_values`; nothing is truncated.

    Args:
        value_model: a :class:`~dvpo_lightning.models.ValueModel`, in eval mode (``freeze``).
        tokenizer: the value model's tokenizer.
        examples: ``{"prompt": P, "responses": {label: text, ...}}`` each; ``P`` a string or a
            chat message list.
        chat_template: apply the tokenizer's chat template to prompts (the data modules'
            ``chat_template``; must match how the model was trained).
        batch_size: ``(prompt, response)`` rows per forward pass.

    Returns:
        One :class:`ExampleValues` per example, responses in the given order.
    """
    flat = []  # (example, label, text, prompt ids, response ids)
    for i, ex in enumerate(examples):
        prompt_ids = encode_prompt(tokenizer, ex["prompt"], chat_template)
        for label, text in ex["responses"].items():
            flat.append((i, label, text, prompt_ids, encode_response(tokenizer, text)))
    device = next(value_model.parameters()).device
    out = [ExampleValues(_prompt_text(ex["prompt"]), []) for ex in examples]
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        batch = collate_prompt_response([c[3] for c in chunk], [c[4] for c in chunk],
                                        tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        values = response_values(value_model, batch["prompt_ids"], batch["prompt_mask"],
                                 batch["response_ids"], batch["response_mask"]).cpu()
        deltas = token_deltas(values, batch["response_mask"].cpu())  # (b, T)
        for row, (i, label, text, _, ids) in enumerate(chunk):
            n = len(ids)
            out[i].responses.append(ResponseValues(
                label=label, text=text, prompt_value=float(values[row, 0]), token_ids=list(ids),
                tokens=token_pieces(tokenizer, ids), values=values[row, 1:n + 1].tolist(),
                deltas=deltas[row, :n].tolist()))
    return out


def _check_color_by(color_by: str) -> None:
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by={color_by!r} is not one of {COLOR_BY}; 'delta' colours "
                         "u_t − u_{t−1}, 'value' colours u_t")


def _shown(r: ResponseValues, color_by: str) -> list[float]:
    return r.deltas if color_by == "delta" else r.values


def color_scale(examples: list[ExampleValues], color_by: str) -> float:
    """``m = max |x|`` over every token's ``delta`` or ``value`` (1.0 when all are 0)."""
    _check_color_by(color_by)
    m = max((abs(x) for ex in examples for r in ex.responses for x in _shown(r, color_by)),
            default=0.0)
    return m if m > 0 else 1.0


def diverging_rgb(x: float, vmax: float) -> tuple[float, float, float]:
    """RGB in ``[0, 1]``: white at 0, linearly to red at ``−vmax`` and to green at ``+vmax``."""
    f = max(-1.0, min(1.0, x / vmax))
    end = _GREEN if f > 0 else _RED
    return tuple((255 + (e - 255) * abs(f)) / 255 for e in end)


def _css(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _ink(x: float, vmax: float) -> str:
    return "#ffffff" if abs(x) > 0.6 * vmax else "#111111"


def _quantity(color_by: str) -> str:
    return "δ_t = u_t − u_{t−1}" if color_by == "delta" else "u_t"


# --- table ---------------------------------------------------------------------------------


def token_rows(examples: list[ExampleValues]) -> list[dict]:
    """One row per response token, columns :data:`TABLE_COLUMNS` (``position`` = ``t``, from 1;
    ``prompt_value`` = ``u_0`` of the response, repeated on its rows)."""
    rows = []
    for i, ex in enumerate(examples):
        for r in ex.responses:
            for t, (tok, tid, v, d) in enumerate(zip(r.tokens, r.token_ids, r.values, r.deltas)):
                rows.append({"example": i, "response": r.label, "position": t + 1, "token": tok,
                             "token_id": tid, "value": v, "delta": d,
                             "prompt_value": r.prompt_value})
    return rows


def write_csv(examples: list[ExampleValues], out_path: str | Path) -> Path:
    """The :func:`token_rows` table as CSV (UTF-8, header row)."""
    out = Path(out_path)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(token_rows(examples))
    return out


def write_json(examples: list[ExampleValues], out_path: str | Path) -> Path:
    """``{"examples": [{example, prompt, responses: [{response, text, prompt_value}]}],
    "rows": token_rows(examples)}`` as JSON."""
    summary = [{"example": i, "prompt": ex.prompt,
                "responses": [{"response": r.label, "text": r.text,
                               "prompt_value": r.prompt_value} for r in ex.responses]}
               for i, ex in enumerate(examples)]
    out = Path(out_path)
    out.write_text(json.dumps({"examples": summary, "rows": token_rows(examples)},
                              ensure_ascii=False, indent=1), encoding="utf-8")
    return out


# --- HTML ----------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.legend{display:flex;align-items:center;gap:.6em;margin:.5em 0 1em}
.bar{width:260px;height:14px;border:1px solid #999;
 background:linear-gradient(to right,%s,#ffffff,%s)}
.example{border-top:1px solid #ccc;padding:.8em 0}
.prompt{white-space:pre-wrap;font-family:monospace;background:#f3f3f3;padding:.4em;margin:.3em 0}
.responses{display:flex;gap:2em;flex-wrap:wrap}
.response{flex:1 1 0;min-width:16em}
.meta{font-size:.85em;color:#555;margin:.2em 0 .4em}
.tokens{font-family:monospace;font-size:1.05em;line-height:2}
.tok{display:inline-block;padding:0 2px;margin:1px;border-radius:2px;white-space:pre;
 border:1px solid #ddd}
"""


def _html_response(r: ResponseValues, color_by: str, vmax: float) -> str:
    spans = []
    for t, (tok, v, d) in enumerate(zip(r.tokens, r.values, r.deltas)):
        x = d if color_by == "delta" else v
        title = f"t={t + 1}  token={tok}  value={v:.4f}  delta={d:+.4f}"
        spans.append(f'<span class="tok" style="background:{_css(diverging_rgb(x, vmax))};'
                     f'color:{_ink(x, vmax)}" title="{html.escape(title)}">'
                     f"{html.escape(tok)}</span>")
        if "⏎" in tok:
            spans.append("<br>")
        spans.append("<wbr>")  # a line may break between any two tokens
    final = r.values[-1] if r.values else r.prompt_value
    return (f'<div class="response"><b>{html.escape(r.label)}</b>'
            f'<div class="meta">u_0 = {r.prompt_value:+.4f} → u_T = {final:+.4f} '
            f"({len(r.tokens)} tokens)</div>"
            f'<div class="tokens">{"".join(spans)}</div></div>')


def render_html(examples: list[ExampleValues], out_path: str | Path,
                color_by: str = "delta", title: str = "Token values") -> Path:
    """A self-contained HTML page (inline CSS, no script): per example the prompt, then its
    responses side by side, each token a span coloured by ``color_by``; hover shows ``t``,
    the value and the step.

    Args:
        examples: from :func:`token_values`.
        out_path: the ``.html`` file to write.
        color_by: ``"delta"`` (``δ_t``) or ``"value"`` (``u_t``).
        title: the page heading.
    """
    vmax = color_scale(examples, color_by)
    red, green = _css(diverging_rgb(-1, 1)), _css(diverging_rgb(1, 1))
    parts = [
        '<!doctype html><html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE % (red, green)}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        f'<div class="legend">colour = {html.escape(_quantity(color_by))}: <span>'
        f'{-vmax:+.3f}</span><span class="bar"></span><span>{vmax:+.3f}</span>'
        "<span>(red negative, white 0, green positive; hover a token for its numbers)</span>"
        "</div>",
    ]
    for i, ex in enumerate(examples):
        cols = "".join(_html_response(r, color_by, vmax) for r in ex.responses)
        parts.append(f'<div class="example"><b>Example {i}</b><div class="prompt">'
                     f'{html.escape(ex.prompt)}</div><div class="responses">{cols}</div></div>')
    parts.append("</body></html>\n")
    out = Path(out_path)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


# --- PNG -----------------------------------------------------------------------------------

_CHAR = 0.085  # inch per character of the 10 pt monospace token font
_LABEL, _LINE, _HEAD = 1.9, 0.52, 0.34  # inches: label column, token line, prompt header
_GAP, _RESP_GAP = 0.22, 0.08  # inches between examples, between responses


def _box_width(tok: str) -> float:
    return _CHAR * max(len(tok), 5) + 0.08  # room for the token or a "+0.12" number


def _wrap(widths: list[float], line_width: float) -> list[list[int]]:
    lines, cur, used = [], [], 0.0
    for j, w in enumerate(widths):
        if cur and used + w > line_width:
            lines.append(cur)
            cur, used = [], 0.0
        cur.append(j)
        used += w
    return lines + [cur] if cur else lines or [[]]


def render_png(examples: list[ExampleValues], out_path: str | Path, color_by: str = "delta",
               max_line_width: float = 9.0, max_tokens: int = 160, dpi: int = 150) -> Path:
    """The same picture with matplotlib (Agg): per example a prompt header, then each response
    as a row of coloured boxes (the token above, ``color_by``'s number below), and a colour bar.

    Args:
        examples: from :func:`token_values`.
        out_path: the ``.png`` file to write.
        color_by: ``"delta"`` (``δ_t``) or ``"value"`` (``u_t``).
        max_line_width: inches of boxes per line before a response wraps.
        max_tokens: tokens drawn per response; the rest is counted, not drawn.
        dpi: resolution.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure  # no pyplot: Agg, and no global backend switch
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    vmax = color_scale(examples, color_by)
    widths = {id(r): [_box_width(t) for t in r.tokens[:max_tokens]]
              for ex in examples for r in ex.responses}
    line_w = min(max_line_width, max((sum(w) for w in widths.values()), default=1.0))
    layout = {k: _wrap(w, line_w) for k, w in widths.items()}
    fig_w = _LABEL + line_w + 0.3
    height = 0.3 + sum(_HEAD + _GAP + sum(_LINE * len(layout[id(r)]) + _RESP_GAP
                                          for r in ex.responses) for ex in examples)
    bar_h = 0.95  # inches under the examples for the colour bar, its ticks and label
    fig = Figure(figsize=(fig_w, height + bar_h))
    ax = fig.add_axes((0, bar_h / (height + bar_h), 1, height / (height + bar_h)))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(height, 0)
    ax.axis("off")
    mono = dict(family="DejaVu Sans Mono", parse_math=False)
    y = 0.15
    max_chars = int((fig_w - 0.2) / (_CHAR * 0.95))
    for i, ex in enumerate(examples):
        head = f"Example {i}: " + ex.prompt.replace("\n", "⏎")
        head = head if len(head) <= max_chars else head[:max_chars - 1] + "…"
        ax.text(0.1, y + _HEAD / 2, head, va="center", fontsize=10, weight="bold", **mono)
        y += _HEAD
        for r in ex.responses:
            final = r.values[-1] if r.values else r.prompt_value
            ax.text(0.1, y + 0.17, r.label, va="center", fontsize=10, weight="bold",
                    parse_math=False)
            ax.text(0.1, y + 0.37, f"$u_0$ {r.prompt_value:+.3f}  $u_T$ {final:+.3f}",
                    va="center", fontsize=7, color="#444")
            shown = _shown(r, color_by)
            for line in layout[id(r)]:
                x = _LABEL
                for j in line:
                    w, v = widths[id(r)][j], shown[j]
                    ax.add_patch(Rectangle((x + 0.01, y + 0.03), w - 0.02, _LINE - 0.08,
                                           facecolor=diverging_rgb(v, vmax), edgecolor="#bbbbbb",
                                           linewidth=0.5))
                    ink = _ink(v, vmax)
                    ax.text(x + w / 2, y + 0.19, r.tokens[j], ha="center", va="center",
                            fontsize=10, color=ink, **mono)
                    ax.text(x + w / 2, y + 0.37, f"{v:+.2f}", ha="center", va="center",
                            fontsize=6.5, color=ink, **mono)
                    x += w
                y += _LINE
            if len(r.tokens) > max_tokens:
                ax.text(fig_w - 0.1, y - 0.05, f"… {len(r.tokens) - max_tokens} more tokens",
                        ha="right", va="bottom", fontsize=7, color="#444")
            y += _RESP_GAP
        y += _GAP
    cmap = ListedColormap([diverging_rgb(x, 1.0) for x in torch.linspace(-1, 1, 257).tolist()])
    cax = fig.add_axes((0.25, 0.5 / (height + bar_h), 0.5, 0.16 / (height + bar_h)))
    bar = fig.colorbar(ScalarMappable(Normalize(-vmax, vmax), cmap), cax=cax,
                       orientation="horizontal")
    bar.set_label(f"colour = ${'u_t - u_{t-1}' if color_by == 'delta' else 'u_t'}$ "
                  "(red negative, green positive)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.locator = MaxNLocator(nbins=5, symmetric=True)  # narrow pictures: no crowded labels
    bar.update_ticks()
    out = Path(out_path)
    fig.savefig(out, dpi=dpi)
    return out
