"""CORE: prompt building, the token boundary, scoring vs a by-hand reference, the real bundle."""

import gzip
import json
import math

import pytest
import torch

from chatforge.eval import core
from chatforge.errors import DataError
from chatforge.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(256)})


class BigramModel(torch.nn.Module):
    """logits[t] = table[token t]: losses and greedy guesses are readable straight from the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, idx):
        return self.table[idx]  # (B, T, V)


def write_bundle(root, tasks: dict, baselines: dict, gz=()):
    import yaml

    entries = []
    for label, (task_type, shots, delim, records) in tasks.items():
        uri = f"cat/{label}.jsonl"
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": task_type}
        if delim is not None:
            entry["continuation_delimiter"] = delim
        entries.append(entry)
        if records is None:
            continue
        path = root / "eval_data" / (uri + (".gz" if label in gz else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
        if label in gz:
            path.write_bytes(gzip.compress(lines.encode()))
        else:
            path.write_text(lines)
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    rows = "".join(f"{k},x,y,0,1,{v},,d\n" for k, v in baselines.items())
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n" + rows)


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow"]


def make_records(seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]  # noqa: E731
    mc = [{"query": f"Q{i}: {pick()} {pick()}?", "choices": [pick(), pick() + " " + pick(), pick()],
           "gold": i % 3} for i in range(n)]
    schema = [{"context_options": [f"{pick()} saw {pick()}", f"{pick()} met {pick()}"],
               "continuation": f"and {pick()}.", "gold": i % 2} for i in range(n)]
    lm = [{"context": f"  {pick()} {pick()} is ", "continuation": "cat" if i % 2 else pick()} for i in range(n)]
    return mc, schema, lm


def reference_scores(table, items, task_type, shots, delim):
    """Each item's correctness from the table directly, on bytes built by hand (no core.py prompts)."""
    logp = torch.log_softmax(table, dim=-1)
    bos = 256

    def span_stats(context: str, continuation: str):
        ids = [bos] + list(context.encode()) + list(continuation.encode())
        first = 1 + len(context.encode())
        losses = [-logp[ids[p - 1], ids[p]].item() for p in range(first, len(ids))]
        greedy = all(int(table[ids[p - 1]].argmax()) == ids[p] for p in range(first, len(ids)))
        return sum(losses) / len(losses), greedy

    correct = []
    for idx, item in enumerate(items):
        fs = [items[j] for j in core.fewshot_indices(len(items), idx, shots)]
        if task_type == "multiple_choice":
            prefix = "".join(s["query"] + delim + s["choices"][s["gold"]] + "\n\n" for s in fs)
            losses = [span_stats(prefix + item["query"] + delim, c)[0] for c in item["choices"]]
            correct.append(losses.index(min(losses)) == item["gold"])
        elif task_type == "schema":
            prefix = "".join(s["context_options"][s["gold"]] + delim + s["continuation"] + "\n\n" for s in fs)
            losses = [span_stats(prefix + o + delim, item["continuation"])[0] for o in item["context_options"]]
            correct.append(losses.index(min(losses)) == item["gold"])
        else:
            prefix = "".join(s["context"].strip() + delim + s["continuation"] + "\n\n" for s in fs)
            # the delimiter's space is scored with the continuation (byte tokens: nothing merges)
            correct.append(span_stats(prefix + item["context"].strip(), delim + item["continuation"])[1])
    return correct


@pytest.fixture
def mini_bundle(tmp_path):
    mc, schema, lm = make_records()
    write_bundle(tmp_path, {
        "mc": ("multiple_choice", 2, "\nAnswer: ", mc),
        "sch": ("schema", 1, None, schema),
        "lm": ("language_modeling", 3, None, lm),
        "gone": ("language_modeling", 0, None, None),
    }, {"mc": 33.3, "sch": 50, "lm": 0, "gone": 0}, gz={"lm"})
    return tmp_path, {"mc": mc, "sch": schema, "lm": lm}


def make_table(records):
    torch.manual_seed(0)
    table = torch.randn(265, 265)
    # teach the greedy path "s -> ' ' -> c -> a -> t", so the LM items answering "cat" are right
    prev = ord("s")
    for b in b" cat":
        table[prev, b] += 20.0
        prev = b
    return table


def test_core_scores_match_a_reference_computed_from_the_table(mini_bundle):
    root, records = mini_bundle
    table = make_table(records)
    model, tok = BigramModel(table), byte_tokenizer()
    result = core.evaluate_core(model, tok, root, "cpu", batch_tokens=300)
    assert result["skipped_tasks"] == ["gone"]
    assert result["num_tasks"] == 3 and "3 task" in result["note"]
    specs = {"mc": ("multiple_choice", 2, "\nAnswer: "), "sch": ("schema", 1, " "), "lm": ("language_modeling", 3, " ")}
    for label, (task_type, shots, delim) in specs.items():
        ref = reference_scores(table, records[label], task_type, shots, delim)
        got = result["tasks"][label]
        assert got["num_items"] == len(ref)
        assert got["num_correct"] == sum(ref), label
    assert 0 < result["tasks"]["lm"]["num_correct"] < len(records["lm"])
    expected = sum(core.centered_accuracy(r["accuracy"], r["baseline"]) for r in result["tasks"].values()) / 3
    assert result["core"] == pytest.approx(expected)


def test_batching_does_not_change_scores(mini_bundle):
    root, records = mini_bundle
    model, tok = BigramModel(make_table(records)), byte_tokenizer()
    small = core.evaluate_core(model, tok, root, "cpu", batch_tokens=1)
    large = core.evaluate_core(model, tok, root, "cpu", batch_tokens=100_000)
    assert small["tasks"] == large["tasks"]


def test_max_per_task_and_truncation(mini_bundle):
    root, records = mini_bundle
    model, tok = BigramModel(make_table(records)), byte_tokenizer()
    result = core.evaluate_core(model, tok, root, "cpu", max_per_task=5, max_seq_len=24)
    assert all(r["num_items"] == 5 for r in result["tasks"].values())
    assert result["tasks"]["mc"]["truncated"] > 0


def test_centered_accuracy():
    assert core.centered_accuracy(0.25, 25) == 0
    assert core.centered_accuracy(1.0, 25) == 1
    assert core.centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert core.centered_accuracy(0.0, 0) == 0


def test_fewshot_draw_is_deterministic_and_excludes_the_item():
    for idx in (0, 7, 99):
        picks = core.fewshot_indices(100, idx, 10)
        assert picks == core.fewshot_indices(100, idx, 10)
        assert len(set(picks)) == 10 and idx not in picks and all(0 <= p < 100 for p in picks)
    assert sorted(core.fewshot_indices(4, 2, 10)) == [0, 1, 3]
    assert core.fewshot_indices(100, 3, 0) == []


def test_continuation_tokens_are_exactly_the_scored_span():
    tok = Tokenizer.train(["the capital is Paris. the capital is Rome. " * 50], vocab_size=300)
    context, continuation = "the capital is ", "Paris"
    s = core.encode_pair(tok, context, continuation, None)
    assert s.ids[0] == tok.bos_id and s.end == len(s.ids)
    assert tok.decode(s.ids[1:]) == context + continuation
    assert tok.decode(s.ids[1:s.start]) + tok.decode(s.ids[s.start:]) == context + continuation
    assert tok.decode(s.ids[s.start:]) == " Paris"
    # BPE merges the delimiter's space into " Paris", so the prefix is shorter than the context's encoding
    assert s.start - 1 < len(tok.encode(context))


def test_malformed_records_are_skipped_and_counted(tmp_path):
    good = [{"query": "q", "choices": ["a", "b"], "gold": 0}] * 3
    write_bundle(tmp_path, {"mc": ("multiple_choice", 0, None, good + ["{not json", {"query": "q", "gold": 5}])},
                 {"mc": 50})
    model = BigramModel(torch.zeros(265, 265))
    result = core.evaluate_core(model, byte_tokenizer(), tmp_path, "cpu")
    assert result["tasks"]["mc"]["num_items"] == 3 and result["tasks"]["mc"]["malformed"] == 2


def test_bundle_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(core.BUNDLE_ENV, raising=False)
    with pytest.raises(DataError, match="core.yaml"):
        core.resolve_bundle(tmp_path)
    write_bundle(tmp_path, {"mc": ("multiple_choice", 0, None, [])}, {"other": 25})
    with pytest.raises(DataError, match="eval_meta_data.csv.*mc"):
        core.load_bundle(tmp_path)
    (tmp_path / "eval_data" / "cat" / "mc.jsonl").unlink()
    (tmp_path / "eval_data" / "cat" / "mc.jsonl.gz").write_bytes(b"not gzip at all")
    write_bundle(tmp_path, {"mc": ("multiple_choice", 0, None, None)}, {"mc": 25})
    with pytest.raises(DataError, match="mc.jsonl.gz is corrupt"):
        core.evaluate_core(BigramModel(torch.zeros(265, 265)), byte_tokenizer(), tmp_path, "cpu")


def test_data_dir_is_the_bundle_or_a_data_folder_holding_it(tmp_path, monkeypatch):
    # --data-dir means one folder in every stage: eval base finds the bundle under eval/core of it
    monkeypatch.delenv(core.BUNDLE_ENV, raising=False)
    bundle = tmp_path / "data" / "eval" / "core"
    write_bundle(bundle, {"mc": ("multiple_choice", 0, None, [])}, {"mc": 25})
    (tmp_path / "data" / "chat").mkdir()
    assert core.resolve_bundle(bundle) == bundle
    assert core.resolve_bundle(tmp_path / "data") == bundle


def test_shared_bundle_loads(shared_data):
    tasks = core.load_bundle(shared_data / "eval" / "core")
    assert len(tasks) == 22
    missing = sorted(t.label for t in tasks if t.path is None)
    assert missing == ["coqa", "squad"]
    for task in tasks:
        if task.path is not None:
            items, malformed = core.read_items(task)
            assert items and malformed == 0, task.label
    by_label = {t.label: t for t in tasks}
    assert by_label["jeopardy"].delimiter == "\nAnswer: " and by_label["copa"].delimiter == " "
    assert by_label["bigbench_language_identification"].baseline == pytest.approx(9.1)


def test_shared_bundle_quick_run_on_a_tiny_gpt(shared_data):
    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = GPT(GPTConfig(sequence_len=96, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    model.eval()
    result = core.evaluate_core(model, tok, shared_data / "eval" / "core", "cpu", max_per_task=4,
                                max_seq_len=96, batch_tokens=4096)
    assert result["num_tasks"] == 20 and result["num_tasks_configured"] == 22
    assert sorted(result["skipped_tasks"]) == ["coqa", "squad"]
    assert "20 task" in result["note"]
    assert all(r["num_items"] == 4 for r in result["tasks"].values())
    assert math.isfinite(result["core"])
    assert sum(r["truncated"] for r in result["tasks"].values()) > 0
