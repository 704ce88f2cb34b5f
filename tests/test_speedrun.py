"""chatforge speedrun: the plan each preset runs, resume markers, torchrun launching, the offline data."""

import argparse
import json
import operator

import pytest

from chatforge import paths, speedrun
from chatforge.errors import UsageError
from chatforge.tasks.custom import validate_training_conversation

LOCAL = speedrun.Sources("local", ["--data", "/d/pretrain/docs"], "/d/eval/core", "/d", [],
                         list(speedrun.CHAT_TASKS), [], [])


def parse(argv):
    parser = argparse.ArgumentParser()
    speedrun.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", sorted(speedrun.PRESETS))
def test_every_preset_runs_the_stages_in_order(name):
    preset = speedrun.PRESETS[name]
    plan = speedrun.build_plan(name, preset, LOCAL, rl=True)
    expected = ["tokenizer", "tokenizer-eval", "pretrain", "eval-base", "midtrain", "eval-mid", "sft", "eval-sft",
                "rl", "eval-rl", "report"]
    assert [s.name for s in plan] == [s for s in expected if not s.startswith("eval-") or s == "eval-base"
                                      or s[5:] in preset.chat_evals]
    for stage in plan:
        assert stage.outputs
        if stage.name in ("pretrain", "midtrain", "sft", "rl"):
            assert "--resume" in stage.argv and stage.argv[stage.argv.index("--tag") + 1] == name
    by_name = {s.name: s for s in plan}
    assert "--data-dir" in by_name["eval-base"].argv
    assert by_name["sft"].argv[by_name["sft"].argv.index("--source") + 1] == "mid"


def test_without_rl_flag_there_is_no_rl_stage():
    plan = speedrun.build_plan("demo", speedrun.PRESETS["demo"], LOCAL, rl=False)
    assert not {"rl", "eval-rl"} & {s.name for s in plan}


def test_gpu_presets_use_fp8_only_for_gpt2():
    assert "--fp8" in speedrun.PRESETS["gpt2"].pretrain and "--fp8" not in speedrun.PRESETS["d20"].pretrain


def test_several_gpus_use_torchrun_for_training_and_eval_only():
    plan = {s.name: s for s in speedrun.build_plan("d20", speedrun.PRESETS["d20"], LOCAL, rl=False)}
    cmd = speedrun.launch_command(plan["pretrain"], nproc=8)
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node=8", "-m"]
    assert cmd[4:6] == ["chatforge", "pretrain"]
    assert speedrun.launch_command(plan["tokenizer"], nproc=8)[1:3] == ["-m", "chatforge"]
    assert speedrun.launch_command(plan["report"], nproc=8)[0] != "torchrun"
    assert speedrun.launch_command(plan["pretrain"], nproc=1)[0] != "torchrun"


def test_a_marker_counts_only_with_the_same_arguments_and_its_outputs(chatforge_home):
    stage = speedrun.Stage("tokenizer-eval", ["tokenizer", "eval"], ["tokenizer/eval.json"])
    marker = {"argv": ["tokenizer", "eval"]}
    assert not speedrun.is_complete(stage, marker)  # the output is missing
    paths.atomic_write_text(paths.tokenizer_dir() / "eval.json", "{}")
    assert speedrun.is_complete(stage, marker)
    assert not speedrun.is_complete(stage, {"argv": ["tokenizer", "eval", "--reference-dir", "x"]})
    assert not speedrun.is_complete(stage, None)


@pytest.mark.slow
def test_offline_fallback_writes_the_corpus_and_generated_conversations(chatforge_home):
    result = speedrun.main(parse(["--preset", "tiny", "--offline", "--stop-after", "data"]))
    assert result["ran"] == []
    marker = json.loads((chatforge_home / "speedrun" / "tiny" / "data.done").read_text())
    src = marker["sources"]
    assert src["mode"] == "offline"
    assert any("OFFLINE FALLBACK" in note for note in src["notes"])
    assert {"CORE", "ARC-Easy", "MMLU", "GSM8K"} <= set(src["skipped_evals"])
    assert "SpellingBee" in src["chat_tasks"]
    corpus = src["corpus_args"][1]
    assert (paths.base_dir() / "data" / "stdlib-docstrings" / "COMPLETE").is_file() and corpus.endswith("docstrings")
    extra = src["mixture_args"][src["mixture_args"].index("--extra") + 1]
    lines = open(extra).read().splitlines()
    assert len(lines) > 1000
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    arithmetic = 0
    for line in lines:
        conv = validate_training_conversation(json.loads(line))
        parts = conv["messages"][-1]["content"]
        if isinstance(parts, list) and parts[1]["text"].count(" ") == 2:  # "a op b" worked in the tool
            a, op, b = parts[1]["text"].split()
            assert parts[2]["text"] == str(ops[op](int(a), int(b)))
            arithmetic += 1
    assert arithmetic >= 1000
    plan = speedrun.build_plan("tiny", speedrun.PRESETS["tiny"], speedrun.Sources(**src), rl=True)
    assert "rl" not in {s.name for s in plan}  # RL needs GSM8K, unreachable offline
    assert "--mixture" in {s.name: s for s in plan}["midtrain"].argv


def test_bad_usage_names_the_flag(chatforge_home, tmp_path):
    with pytest.raises(UsageError, match="--stop-after"):
        speedrun.main(parse(["--preset", "tiny", "--offline", "--stop-after", "nonsense"]))
    with pytest.raises(UsageError, match="--data-dir"):
        speedrun.main(parse(["--preset", "tiny", "--data-dir", str(tmp_path / "absent")]))


def test_local_copy_without_the_preset_corpus_is_refused(chatforge_home, tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(UsageError, match="pretrain/docs"):
        speedrun.main(parse(["--preset", "demo", "--data-dir", str(tmp_path)]))


def test_name_goes_to_midtrain_and_sft_and_into_the_offline_conversations(chatforge_home):
    plan = {s.name: s for s in speedrun.build_plan("tiny", speedrun.PRESETS["tiny"], LOCAL, rl=False,
                                                   model_name="Zed")}
    for stage in ("midtrain", "sft"):
        assert plan[stage].argv[plan[stage].argv.index("--name") + 1] == "Zed"
    assert "--name" not in plan["pretrain"].argv
    unnamed = speedrun.build_plan("tiny", speedrun.PRESETS["tiny"], LOCAL, rl=False)
    assert not any("--name" in s.argv for s in unnamed)  # the argv of runs without a name is unchanged

    offline = speedrun.Sources("offline", [], None, None, ["--mixture", "extra", "--extra", "/x/conversations.jsonl"],
                               ["SpellingBee"], [], [])
    named = speedrun.with_model_name(offline, "Zed")
    path = named.mixture_args[named.mixture_args.index("--extra") + 1]
    text = open(path).read()
    assert "I'm Zed" in text and "I'm chatforge" not in text
    assert speedrun.with_model_name(offline, None) is offline and speedrun.with_model_name(LOCAL, "Zed") is LOCAL
