"""Token-value pictures and the ``explain`` command: alignment with training, files, errors."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.commands.explain import _expand_responses, explain
from dvpo_lightning.commands.explain import main as explain_main
from dvpo_lightning.data.collate import collate_prompt_response
from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.examples import file_examples
from dvpo_lightning.data.tokenize import encode_prompt, encode_response
from dvpo_lightning.report.token_values import (
    TABLE_COLUMNS,
    ExampleValues,
    ResponseValues,
    render_html,
    render_png,
    token_deltas,
    token_pieces,
    token_rows,
    token_values,
    visible,
    write_csv,
    write_json,
)
from dvpo_lightning.rollout.scoring import response_values

T, F = True, False
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gvm(artifacts):
    from dvpo_lightning.models import ValueModel, freeze, load_tokenizer

    tok = load_tokenizer(artifacts.gvm)
    return freeze(ValueModel.from_pretrained(artifacts.gvm, tok)), tok


@pytest.fixture(scope="module")
def results(gvm, task_data):
    model, tok = gvm
    examples = file_examples(os.path.join(task_data, "eval_pairs.jsonl"), 3)
    return examples, token_values(model, tok, examples, batch_size=4)  # batches mix prompts


def _fake() -> list[ExampleValues]:
    r = ResponseValues(label="a<b", text="x", prompt_value=0.5, token_ids=[7, 8, 2],
                       tokens=["<script>", "a&b", "<eos>"], values=[1.0, -0.5, 0.25],
                       deltas=[0.5, -1.5, 0.75])
    return [ExampleValues(prompt="p <i>", responses=[r])]


def test_token_deltas_known_answer():
    values = torch.tensor([[0.0, 1.0, 3.0, 2.0], [1.0, -1.0, 9.0, 9.0]])
    mask = torch.tensor([[T, T, T], [T, F, F]])
    assert_close(token_deltas(values, mask), torch.tensor([[1.0, 2.0, -1.0], [-2.0, 0.0, 0.0]]))


def test_rows_match_response_values_alone(gvm, results):
    """Batched, left-padded rows equal one unpadded ``response_values`` call per response."""
    model, tok = gvm
    examples, out = results
    for ex, got in zip(examples, out):
        assert [r.label for r in got.responses] == ["chosen", "rejected"]
        prompt = encode_prompt(tok, ex["prompt"])
        for r in got.responses:
            ids = encode_response(tok, ex["responses"][r.label])
            b = collate_prompt_response([prompt], [ids], tok.pad_token_id)
            with torch.no_grad():
                u = response_values(model, **b)[0]  # (T + 1,)
            assert r.token_ids == ids and ids[-1] == tok.eos_token_id
            assert len(r.tokens) == len(r.values) == len(r.deltas) == len(ids)  # incl. EOS
            assert r.tokens[-1] == tok.eos_token
            assert_close(torch.tensor(r.prompt_value), u[0], atol=1e-5, rtol=0)
            assert_close(torch.tensor(r.values), u[1:], atol=1e-5, rtol=0)
            assert_close(torch.tensor(r.deltas), u[1:] - u[:-1], atol=1e-5, rtol=0)
            assert sum(r.deltas) == pytest.approx(r.values[-1] - r.prompt_value, abs=1e-5)
            assert "".join(r.tokens[:-1]) == ex["responses"][r.label]  # digits: one char each


def test_token_pieces_show_whitespace_and_special_tokens(tokenizer_dir):
    from dvpo_lightning.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    assert token_pieces(tok, encode_response(tok, "12=")) == ["1", "2", "=", tok.eos_token]
    assert visible("a b\n\tc") == "a·b⏎⇥c"


def test_html_has_every_token_escaped(results, tmp_path):
    _, out = results
    text = render_html(out, tmp_path / "t.html").read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and "<script" not in text
    for ex in out:
        for r in ex.responses:
            for tok in r.tokens:
                assert f">{tok.replace('<', '&lt;').replace('>', '&gt;')}</span>" in text
    fake = render_html(_fake(), tmp_path / "f.html", color_by="value").read_text()
    assert "&lt;script&gt;" in fake and "<script>" not in fake and "a&amp;b" in fake
    assert "a&lt;b" in fake and "p &lt;i&gt;" in fake
    assert 'title="t=2  token=a&amp;b  value=-0.5000  delta=-1.5000"' in fake
    assert "-1.000" in fake and "+1.000" in fake  # value scale: max |u_t| = 1, symmetric


def test_png_is_a_png(results, tmp_path):
    _, out = results
    for color_by in ("delta", "value"):
        data = render_png(out, tmp_path / f"{color_by}.png", color_by=color_by).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_table_rows_csv_and_json(results, tmp_path):
    _, out = results
    n = sum(len(r.tokens) for ex in out for r in ex.responses)
    rows = token_rows(out)
    assert len(rows) == n and rows[0]["position"] == 1 and rows[0]["example"] == 0
    with write_csv(out, tmp_path / "t.csv").open(encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert len(read) == n and tuple(read[0]) == TABLE_COLUMNS
    assert float(read[0]["value"]) == pytest.approx(rows[0]["value"])
    data = json.loads(write_json(out, tmp_path / "t.json").read_text(encoding="utf-8"))
    assert len(data["rows"]) == n and len(data["examples"]) == len(out)
    assert data["examples"][0]["responses"][0]["prompt_value"] == out[0].responses[0].prompt_value


def test_explain_prompt_and_responses(artifacts, tmp_path, capsys):
    explain_main(["--gvm", artifacts.gvm, "--prompt", "6495028=", "--responses", "0224456889",
                  "0024868899", "--out", str(tmp_path), "--color_by", "value"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("explain: wrote ") for line in lines)
    for name in ("html", "png", "csv", "json"):
        assert (tmp_path / f"token_values.{name}").stat().st_size > 0
    data = json.loads((tmp_path / "token_values.json").read_text())
    assert [r["text"] for r in data["examples"][0]["responses"]] == ["0224456889", "0024868899"]
    assert len(data["rows"]) == 22  # 10 + 10 digits, one EOS each


def test_explain_file(artifacts, task_data, tmp_path, capsys):
    paths = explain(artifacts.gvm, file=os.path.join(task_data, "eval_pairs.jsonl"),
                    out=str(tmp_path), max_examples=2)
    assert set(paths) == {"html", "png", "csv", "json"}
    data = json.loads(open(paths["json"]).read())
    assert [[r["response"] for r in ex["responses"]] for ex in data["examples"]] == [
        ["chosen", "rejected"]] * 2
    assert open(paths["png"], "rb").read(8) == PNG_MAGIC


def test_explain_file_with_responses_lists(artifacts, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "321=", "responses": ["123", "132", "12"]}) + "\n")
    paths = explain(artifacts.gvm, file=str(path), out=str(tmp_path / "out"))
    data = json.loads(open(paths["json"]).read())
    assert [r["response"] for r in data["examples"][0]["responses"]] == [
        "response 1", "response 2", "response 3"]
    path.write_text(json.dumps({"prompt": "321=", "responses": ["123", ""]}) + "\n")
    with pytest.raises(DataFormatError, match=r"row 0 \(line 1\): field 'responses' must be"):
        explain(artifacts.gvm, file=str(path), out=str(tmp_path / "out"))


def test_expand_responses():
    assert _expand_responses(["--responses", "007", "1 2", "--out", "x", "--responses=9"]) == [
        "--responses+", "007", "--responses+", "1 2", "--out", "x", "--responses+", "9"]


@pytest.mark.parametrize("kwargs,message", [
    ({}, "no input: give either --prompt with --responses, or --file"),
    ({"prompt": "1=", "responses": ["1"], "file": "x.jsonl"},
     r"--file \('x.jsonl'\) cannot be combined with --prompt/--responses"),
    ({"prompt": "1="}, r"--prompt \('1='\) needs at least one --responses"),
    ({"responses": ["1"]}, "--responses needs a --prompt"),
    ({"prompt": "1=", "responses": ["1", " "]}, r"--responses\[1\] is empty"),
    ({"prompt": "1=", "responses": ["1"], "color_by": "mean"},
     r"--color_by='mean' is not one of \('delta', 'value'\)"),
    ({"file": "x.jsonl", "max_examples": 0}, "--max_examples=0 must be at least 1"),
])
def test_explain_argument_errors(artifacts, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        explain(artifacts.gvm, out=str(tmp_path), **kwargs)
    assert "Fix: " in str(err.value)


def test_explain_gvm_errors(artifacts, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no value_head.safetensors, so it is not a "
                       "value model") as err:
        explain_main(["--gvm", artifacts.policy, "--prompt", "1=", "--responses", "1"])
    assert "Fix: point --gvm at the GVM stage's export_dir" in str(err.value)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        explain(str(tmp_path / "missing"), prompt="1=", responses=["1"])
