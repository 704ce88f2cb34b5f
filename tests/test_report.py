"""chatforge report: tables that match the stages' JSON, plots that open, "not run" for absent stages."""

import json
import re
from argparse import Namespace

import pytest
from PIL import Image

from chatforge import paths, report
from chatforge.errors import UsageError
from chatforge.model.checkpoint import save_checkpoint
from tiny_chat import tiny_model

# ARC-Easy at 0.20 is below its chance of 0.25: it must read as worse than guessing
CHAT_SFT = {"chatcore": 0.123456, "step": 3, "tasks": {
    "ARC-Easy": {"accuracy": 0.20, "baseline": 0.25, "num_problems": 8},
    "ARC-Challenge": {"accuracy": 0.25, "baseline": 0.25, "num_problems": 8},
    "MMLU": {"accuracy": 0.3125, "baseline": 0.25, "num_problems": 16},
    "GSM8K": {"accuracy": 0.0625, "baseline": 0.0, "num_problems": 16},
    "HumanEval": {"accuracy": 0.0, "baseline": 0.0, "num_problems": 4},
    "SpellingBee": {"accuracy": 0.5, "baseline": 0.0, "num_problems": 4}}}
CORE = {"core": 0.0421, "step": 4, "tasks": {"copa": {"accuracy": 0.55, "centered": 0.1, "num_items": 20},
                                   "piqa": {"accuracy": 0.5, "centered": -0.0158, "num_items": 20}}}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def save_ckpt(stage, tag, step, **extra):
    model = tiny_model(300)
    save_checkpoint(stage, tag, step, model, None, model_config=model.config.to_dict(), vocab_size=300,
                    tokenizer_name="stories-300", extra=extra)


def make_run(home, tag="t1"):
    save_ckpt("base", tag, 4, data="stories.txt (1 file)")
    save_ckpt("sft", tag, 3, source=f"base/{tag}/step 4", data="--extra me.jsonl")
    write(home / "eval" / "base" / tag / "samples.json", {"step": 4, "samples": [
        {"prompt": "The capital of France is", "completion": " a red house"}]})
    write(home / "tokenizer" / "train.json", {"vocab_size": 1024, "characters": 5000, "documents": 7,
                                              "train_seconds": 0.1})
    write(home / "tokenizer" / "eval.json", {"samples": {"news": {"bytes": 100, "ours": {"tokens": 40,
                                                                                       "bytes_per_token": 2.5}}}})
    write(home / "eval" / "base" / tag / "pretrain.json", {
        "depth": 2, "parameters": 1000, "training_tokens": 2048, "flops_per_token": 6000.0, "num_iterations": 4,
        "wall_time_s": 3.0, "tok_per_s": 680.0, "final_val_bpb": 2.71828, "world_size": 1,
        "torch": "2.x", "python": "3.11", "host": "box", "cpu_count": 2, "git_commit": "abc"})
    write(home / "eval" / "base" / tag / "core.json", CORE)
    write(home / "eval" / "sft" / tag / "chat.json", CHAT_SFT)
    run = home / "runs" / "pretrain-1"
    write(run / "meta.json", {"stage": "pretrain", "args": {"tag": tag}})
    rows = [{"step": s, "train_loss": 8.0 - s} for s in range(1, 5)] + [{"step": 0, "val_bpb": 3.0},
                                                                         {"step": 4, "val_bpb": 2.7}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def table_after(md: str, heading: str) -> dict[str, list[str]]:
    """The first Markdown table after `heading`, as first cell -> other cells."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def run_report(**kw):
    args = Namespace(html=kw.get("html", False), tag=kw.get("tag"), preset=None, gpu_hour_cost=2.5)
    return report.main(args)


def test_eval_table_matches_the_json_and_missing_stages_say_not_run(chatforge_home):
    make_run(chatforge_home)
    md = run_report().read_text()
    table = table_after(md, "## Evaluations by stage")
    assert table["CORE"][:2] == ["0 (centered)", f"{CORE['core']:.4f}"]
    for task, result in CHAT_SFT["tasks"].items():
        chance, base, mid, sft, rl = table[task]
        assert sft == f"{result['accuracy']:.4f}" and chance == f"{result['baseline']:.4f}"
        assert base == mid == rl == "not run"
    assert table["ChatCORE"][3] == f"{CHAT_SFT['chatcore']:.4f}"
    core_table = table_after(md, "## CORE by task")
    for task, result in CORE["tasks"].items():
        assert core_table[task] == [str(result["num_items"]), f"{result['accuracy']:.4f}",
                                    f"{result['centered']:.4f}"]
    pretrain = table_after(md, "## Pretraining")
    assert pretrain["final val bpb"] == ["2.7183"]
    assert pretrain["training FLOPs"] == [f"{6000.0 * 2048:.3e}"]
    mids = table_after(md, "## Midtraining, SFT, RL")
    assert mids["mid"][0] == "not run"


def test_plots_open_as_images_and_html_inlines_them(chatforge_home):
    import matplotlib.image

    make_run(chatforge_home)
    md = run_report(html=True).read_text()
    out = paths.report_dir()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(linked) == {"loss.png", "bpb.png", "evals.png"}
    for name in linked:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "<td>not run</td>" in page


def test_no_results_names_the_fix(chatforge_home):
    with pytest.raises(UsageError, match="chatforge speedrun"):
        run_report()


def test_cost_uses_the_gpu_hour_flag(chatforge_home):
    make_run(chatforge_home)
    pre = chatforge_home / "eval" / "base" / "t1" / "pretrain.json"
    meta = json.loads(pre.read_text())
    meta.update(gpu="H100", gpu_count=8, wall_time_s=3600.0)
    pre.write_text(json.dumps(meta))
    md = run_report().read_text()
    machine = table_after(md, "## Machine and provenance")
    assert machine["GPU"] == ["8 x H100"]
    assert machine["estimated cost"] == ["$20.00 at $2.50/GPU-hour"]


def test_a_resumed_runs_relogged_steps_replace_the_crashed_ones(chatforge_home):
    make_run(chatforge_home)
    metrics = chatforge_home / "runs" / "pretrain-1" / "metrics.jsonl"
    with metrics.open("a") as f:  # the crashed run logged steps 3-4, the resumed one logs them again
        f.write(json.dumps({"step": 3, "train_loss": 1.5}) + "\n" + json.dumps({"step": 4, "train_loss": 1.0}) + "\n")
    rows = report.read_metrics(report.find_run("pretrain", "t1"))
    assert report.curve(rows, "train_loss") == [(1, 7.0), (2, 6.0), (3, 1.5), (4, 1.0)]
    assert report.curve(rows, "val_bpb") == [(0, 3.0), (4, 2.7)]


def test_a_figure_a_stage_did_not_measure_says_why_not_none(chatforge_home):
    make_run(chatforge_home)
    summary_path = chatforge_home / "eval" / "base" / "t1" / "pretrain.json"
    summary = json.loads(summary_path.read_text())
    write(summary_path, {**summary, "final_val_bpb": None, "not_measured": {"final_val_bpb": "--eval-every 0"}})
    save_ckpt("mid", "t1", 3, source="base/t1/step 4")
    write(chatforge_home / "eval" / "mid" / "t1" / "midtrain.json", {
        "num_iterations": 3, "final_train_loss": 1.5, "final_val_loss": None, "wall_time_s": 2.0})
    md = run_report().read_text()
    assert "None" not in md
    assert table_after(md, "## Pretraining")["final val bpb"] == ["not measured (--eval-every 0)"]
    assert table_after(md, "## Midtraining, SFT, RL")["mid"][:3] == ["3", "1.5000", "not measured"]


def test_the_chart_is_on_the_centered_scale_so_below_chance_reads_below_zero(chatforge_home):
    make_run(chatforge_home)
    centered = report.centered_table(report.collect("t1", None))
    assert centered["ARC-Easy"]["sft"] == pytest.approx((0.20 - 0.25) / 0.75)  # negative: worse than guessing
    assert centered["ARC-Challenge"]["sft"] == 0.0 and centered["SpellingBee"]["sft"] == 0.5
    assert centered["CORE"]["base"] == CORE["core"] and centered["ChatCORE"]["sft"] == CHAT_SFT["chatcore"]
    # the tallest bar is the best score above chance, never an accuracy next to centered scores
    best = max((v, row) for row, by in centered.items() for v in by.values() if v is not None)
    assert best[1] == "SpellingBee"


def test_lineage_says_where_each_checkpoint_came_from_and_on_what_data(chatforge_home):
    make_run(chatforge_home)
    save_ckpt("base", "other", 2, data="unrelated.txt")  # another tag, not an ancestor: not listed
    md = run_report().read_text()
    lineage = table_after(md, "## Checkpoints and lineage")
    assert set(lineage) == {"base/t1 step 4", "sft/t1 step 3"}
    assert lineage["base/t1 step 4"][:3] == ["scratch (random init)", "stories.txt (1 file)", "stories-300"]
    assert lineage["sft/t1 step 3"][:3] == ["base/t1 step 4", "--extra me.jsonl", "stories-300"]
    assert "- 'The capital of France is' -> ' a red house'" in md  # the base model's recorded samples


def test_an_sft_variant_from_another_tag_shows_its_source(chatforge_home):
    make_run(chatforge_home)
    save_ckpt("sft", "v2", 5, source="base/t1/step 4", data="--extra other.jsonl")
    lineage = table_after(run_report(tag="v2").read_text(), "## Checkpoints and lineage")
    assert list(lineage) == ["base/t1 step 4", "sft/v2 step 5"]


def test_the_eval_of_a_deleted_checkpoint_is_not_shown(chatforge_home):
    import shutil

    make_run(chatforge_home)
    shutil.rmtree(chatforge_home / "checkpoints" / "sft" / "t1")
    md = run_report().read_text()
    table = table_after(md, "## Evaluations by stage")
    assert table["ARC-Easy"][3] == "not run" and table["ChatCORE"][3] == "not run"
    assert "sft/t1" not in "".join(table_after(md, "## Checkpoints and lineage"))
    assert "eval/sft/t1/chat.json is left out: its checkpoint (sft/t1 step 3) is no longer on disk" in md
