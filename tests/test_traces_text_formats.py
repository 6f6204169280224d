"""ShareGPT JSON and vLLM's custom JSONL: read with a tokenizer or the length approximation, bad rows named by
file and line, and `twinfer trace export` back to vLLM's custom dataset."""

import json

import pytest

from traces import TraceError, TraceWarning, read_trace
from traces.arrivals import Poisson
from traces.text_length import approximate_token_count
from twinfer.cli import main

transformers = pytest.importorskip("transformers")
VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A word-level tokenizer (w0 ... w61) saved like a Hugging Face folder: one token per word, exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return str(folder)


def sharegpt(tmp_path, entries, text=None):
    path = tmp_path / "sharegpt.json"
    path.write_text(text if text is not None else json.dumps(entries, indent=1))
    return path


def conversation(prompt, completion):
    return {"id": "x", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": completion}]}


def test_sharegpt_with_a_tokenizer_counts_exactly_and_keeps_token_ids(tmp_path, tokenizer_folder):
    path = sharegpt(tmp_path, [conversation("w1 w2 w3", "w4 w5"), {"conversations": [{"value": "w1"}]},
                               conversation("w7 w7 w7 w7 w7", "w9")])
    with pytest.warns(TraceWarning, match="fewer than two turns"):
        trace = read_trace(path, tokenizer=tokenizer_folder, arrivals=Poisson(2.0), seed=1)
    assert trace.source_format == "sharegpt"  # detected from the first entry's "conversations"
    assert trace.table.column("prompt_len").to_pylist() == [3, 5]
    assert trace.table.column("output_len").to_pylist() == [2, 1]
    assert trace.table.column("prompt_token_ids").to_pylist()[0] == [3, 4, 5]
    assert any("fewer than two turns (line 15)" in note for note in trace.notes)
    assert trace.duration > 0  # Poisson arrivals


def test_sharegpt_without_a_tokenizer_approximates_from_characters(tmp_path):
    prompt, completion = "Tell me about paged attention, please.", "It stores the KV cache in blocks."
    trace = read_trace(sharegpt(tmp_path, [conversation(prompt, completion)]))
    assert trace.table.column("prompt_len").to_pylist() == [approximate_token_count(prompt)] == [10]
    assert trace.table.column("output_len").to_pylist() == [approximate_token_count(completion)]
    assert any("characters / 4" in note for note in trace.notes)


@pytest.mark.parametrize("text, line, message", [
    ('[\n {"conversations": []},\n 7\n]', 3, "expected a conversation object"),
    ('[\n {"conversations": [{"value": "a"}, {"value": "b"}]},\n {"turns": []}\n]', 3, "no \"conversations\" list"),
    ('[\n\n {"conversations": [{"value": "a"}, {"from": "gpt"}]}\n]', 3, "turn 2 of the conversation has no text"),
    ('[\n {"conversations": [{"value": "a"}, {"value": "b"}]},\n {"conversations": [}\n]', 3, "not valid JSON"),
])
def test_bad_sharegpt_entries_name_file_and_line(tmp_path, text, line, message):
    path = sharegpt(tmp_path, None, text)
    with pytest.raises(TraceError, match=message) as error:
        read_trace(path, format="sharegpt")
    assert (error.value.path, error.value.line) == (str(path), line)


def test_vllm_custom_jsonl(tmp_path, tokenizer_folder):
    path = tmp_path / "custom.jsonl"
    path.write_text('{"prompt": "w1 w2", "output_tokens": 10}\n\n{"prompt": "w3 w4 w5 w6", "output_tokens": 3}\n')
    trace = read_trace(path, tokenizer=tokenizer_folder)
    assert trace.source_format == "vllm_custom"
    assert trace.table.column("prompt_len").to_pylist() == [2, 4]
    assert trace.table.column("output_len").to_pylist() == [10, 3]
    assert read_trace(path).table.column("prompt_len").to_pylist() == [approximate_token_count("w1 w2"),
                                                                       approximate_token_count("w3 w4 w5 w6")]


@pytest.mark.parametrize("text, line, message", [
    ('{"prompt": "a", "output_tokens": 3}\n{"prompt": "b"}\n', 2, "no \"output_tokens\""),
    ('{"prompt": "a", "output_tokens": 3}\n\n{"prompt": 5, "output_tokens": 3}\n', 3, "no \"prompt\" text"),
    ('{"prompt": "a", "output_tokens": "many"}\n', 1, "not a non-negative whole number"),
    ('{"prompt": "a", "output_tokens": 3}\n{"prompt": "a",\n', 2, "not a JSON object"),
])
def test_bad_vllm_custom_rows_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "custom.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=message) as error:
        read_trace(path, format="vllm-custom")
    assert (error.value.path, error.value.line) == (str(path), line)


def test_export_to_vllm_custom_round_trips(tmp_path, tokenizer_folder, capsys):
    out = tmp_path / "demo.jsonl"
    assert main(["trace", "export", "demo", "--format", "vllm-custom", "--tokenizer", tokenizer_folder,
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    demo = read_trace("demo")
    assert len(rows) == len(demo) == 24
    assert [row["output_tokens"] for row in rows] == demo.table.column("output_len").to_pylist()
    # Read back with the same tokenizer: the trace's prompt lengths, and its shared prefixes still shared.
    back = read_trace(out, tokenizer=tokenizer_folder)
    assert back.table.column("prompt_len").to_pylist() == demo.table.column("prompt_len").to_pylist()
    words = [row["prompt"].split() for row in rows]
    assert sum(a[:64] == b[:64] for a, b in zip(words, words[1:])) > 0
    printed = capsys.readouterr().out
    assert "--dataset-name custom" in printed and "--disable-shuffle" in printed


def test_export_needs_a_tokenizer_and_replay_reads_sharegpt(tmp_path, tokenizer_folder, capsys):
    with pytest.raises(SystemExit):
        main(["trace", "export", "demo", "--out", str(tmp_path / "x.jsonl")])
    path = sharegpt(tmp_path, [conversation("w1 w2 w3", "w4 w5 w6 w7")] * 6)
    assert main(["simulate", str(path), "--model", "qwen3-0.6b", "--out", str(tmp_path / "run"), "--no-progress",
                 "--arrivals", "poisson:5"]) == 0
    assert "Successful requests:                     6" in capsys.readouterr().out
