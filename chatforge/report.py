"""`chatforge report`: the report card of a run, assembled from every stage's JSON.

    chatforge report                 # <base>/report/report.md plus loss.png, bpb.png, evals.png
    chatforge report --html          # also report.html: one self-contained page (images inlined)

It only reads what the stages wrote (nothing is recomputed, so every number comes from the run):
the checkpoints' meta.json (lineage: which stage, tag and step each came from, on what data, with
which tokenizer); the tokenizer's train.json and eval.json; eval/base/<tag>/{pretrain,core,bpb,
samples}.json; eval/<stage>/<tag>/chat.json for base, mid, sft and rl (with each chat model's greedy
replies, its samples); eval/mid/<tag>/midtrain.json, eval/sft/<tag>/sft.json, eval/rl/<tag>/rl.json;
runs/<id>/metrics.jsonl + meta.json for the curves; and, when the run was a `chatforge speedrun`,
the stage markers under speedrun/<preset>/ for durations and data notes.
A stage whose JSON is missing is shown as "not run"; a result whose checkpoint is no longer on disk
is left out with a note, so nothing is shown next to the current models that they did not earn.
The evaluation chart plots centered scores only (0 = chance, 1 = perfect): an accuracy below
chance reads as a negative bar, never as the tallest one.

The page is built once as a list of blocks (heading, paragraph, table, image, list) and rendered to
Markdown and, on request, HTML, so the two always say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from chatforge import paths
from chatforge.errors import CheckpointError, UsageError
from chatforge.model import checkpoint
from chatforge.progress import format_duration
from chatforge.runtime import print0
from chatforge.speedrun import STAGES
from chatforge.tasks import EVAL_TASKS
from chatforge.train.stage import describe_data

NOT_RUN = "not run"
CHAT_STAGES = ("base", "mid", "sft", "rl")
EVAL_ROWS = ("CORE", *EVAL_TASKS, "ChatCORE")
TRAIN_SUMMARIES = {"mid": "midtrain.json", "sft": "sft.json", "rl": "rl.json"}


# ---------------------------------------------------------------------------------------------
# reading


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_preset() -> str | None:
    root = paths.speedrun_dir()
    runs = [d for d in root.iterdir() if d.is_dir() and any(d.glob("*.done"))] if root.is_dir() else []
    return max(runs, key=lambda d: max(f.stat().st_mtime for f in d.glob("*.done"))).name if runs else None


def latest_tag() -> str | None:
    root = paths.stage_eval_dir("base")
    tags = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    return max(tags, key=lambda d: d.stat().st_mtime).name if tags else None


def find_run(stage: str, tag: str) -> Path | None:
    """The newest runs/<id>/ whose meta.json says it trained `stage` with `tag`."""
    root = paths.runs_dir(create=False)
    best = None
    for meta_path in root.glob("*/meta.json") if root.is_dir() else []:
        meta = _load(meta_path) or {}
        if meta.get("stage") == stage and (meta.get("args") or {}).get("tag") == tag:
            if best is None or meta_path.stat().st_mtime > best.stat().st_mtime:
                best = meta_path
    return best.parent if best else None


def read_metrics(run: Path | None) -> list[dict]:
    if run is None or not (run / "metrics.jsonl").is_file():
        return []
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return rows


def collect(tag: str | None, preset: str | None) -> dict:
    """Every JSON the report uses, each None when its stage did not run or its checkpoint is gone."""
    base = paths.base_dir()
    preset = preset or latest_preset()
    markers = {}
    if preset:
        for path in sorted((base / "speedrun" / preset).glob("*.done")):
            markers[path.stem] = _load(path)
    tag = tag or (preset if preset and (base / "eval" / "base" / preset).is_dir() else None) or latest_tag()
    if tag is None:
        raise UsageError("no stage has written results under "
                         f"{base / 'eval'} yet; run `chatforge speedrun` (or the stages) first, or pass --tag")
    ev = base / "eval"
    lineage = checkpoint_lineage(tag)
    gone: list[str] = []

    def kept(stage: str, name: str) -> dict | None:
        result = _load(ev / stage / tag / name)
        if result is not None and not on_disk(result, stage, tag):
            step = result.get("step")
            gone.append(f"eval/{stage}/{tag}/{name} is left out: its checkpoint ({stage}/{tag}"
                        f"{f' step {step}' if step is not None else ''}) is no longer on disk")
            return None
        return result

    tokenizer = tokenizer_folder(lineage)
    data = {
        "preset": preset, "tag": tag, "markers": markers, "lineage": lineage,
        "absent": ((_load(base / "speedrun" / preset / "absent.json") or {}).get("stages", []) if preset else []),
        "tokenizer_train": _load(tokenizer / "train.json"),
        "tokenizer_eval": _load(tokenizer / "eval.json"),
        "pretrain": kept("base", "pretrain.json"),
        "core": kept("base", "core.json"),
        "bpb": kept("base", "bpb.json"),
        "samples": kept("base", "samples.json"),
        "chat": {stage: kept(stage, "chat.json") for stage in CHAT_STAGES},
        "train": {stage: kept(stage, name) for stage, name in TRAIN_SUMMARIES.items()},
    }
    data["gone"] = gone
    data["curves"] = {"base": read_metrics(find_run("pretrain", tag)) if data["pretrain"] else []}
    for stage, summary in data["train"].items():
        run_id = (summary or {}).get("run_id")
        data["curves"][stage] = read_metrics(base / "runs" / run_id) if run_id else []
    return data


def on_disk(result: dict, stage: str, tag: str) -> bool:
    """Whether the checkpoint a stage's JSON speaks of still exists: the step it names (an eval), or
    the checkpoint folder it wrote (a training summary), else any step of stage/tag."""
    steps = checkpoint.list_steps(stage, tag)
    if result.get("step") is not None:
        return result["step"] in steps
    if result.get("checkpoint"):
        return Path(result["checkpoint"]).is_dir()
    return bool(steps)


def checkpoint_lineage(tag: str) -> list[dict]:
    """The checkpoints on disk for `tag` in every stage, and the ones they started from (which may
    carry another tag), in pipeline order: stage, tag, latest step, source, data, tokenizer, metrics."""
    wanted = [(stage, tag) for stage in CHAT_STAGES if checkpoint.list_steps(stage, tag)]
    found: dict[tuple, dict] = {}
    while wanted:
        stage, t = wanted.pop()
        if (stage, t) in found or not checkpoint.list_steps(stage, t):
            continue
        try:
            meta = checkpoint.read_meta(checkpoint.resolve(stage, t)[2])
        except CheckpointError:
            continue
        source = checkpoint.parse_source(meta.get("source"))
        found[(stage, t)] = {"stage": stage, "tag": t, "step": meta.get("step"), "source": source,
                             "data": meta.get("data") or describe_data(meta.get("args") or {}),
                             "tokenizer": meta.get("tokenizer"), "metrics": meta.get("metrics") or {},
                             "steps": checkpoint.list_steps(stage, t)}
        if source is not None:
            wanted.append(source[:2])
    return sorted(found.values(), key=lambda c: (CHAT_STAGES.index(c["stage"]), c["tag"] != tag, c["tag"]))


def tokenizer_folder(lineage: list[dict]) -> Path:
    """The folder of the tokenizer the report's base model was trained with (else the current one)."""
    from chatforge.tokenizer import current_tokenizer_name

    names = [c["tokenizer"] for c in lineage if c["stage"] == "base"]
    return paths.tokenizer_dir(names[0] if names else current_tokenizer_name(), create=False)


# ---------------------------------------------------------------------------------------------
# the numbers, as tables


def measured_or_why(summary: dict, figure: str) -> str:
    """What a stage that ran says in place of a figure it did not measure (its summary's reason)."""
    why = (summary.get("not_measured") or {}).get(figure)
    return f"not measured ({why})" if why else "not measured"


def fmt(value, digits: int = 4, missing: str = NOT_RUN) -> str:
    if value is None:
        return missing
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def eval_table(data: dict) -> dict[str, dict[str, float | None]]:
    """metric -> stage -> value (None: not run) for CORE, the chat tasks and ChatCORE."""
    table = {row: {stage: None for stage in CHAT_STAGES} for row in EVAL_ROWS}
    if data["core"]:
        table["CORE"]["base"] = data["core"].get("core")
    for stage, chat in data["chat"].items():
        if not chat:
            continue
        for task, result in (chat.get("tasks") or {}).items():
            if task in table:
                table[task][stage] = result.get("accuracy")
        table["ChatCORE"][stage] = chat.get("chatcore")
    return table


def provenance_of(data: dict) -> dict:
    """The run's provenance as its stages recorded it (the pretraining summary first)."""
    for source in (data["pretrain"], data["core"], (data["tokenizer_train"] or {}).get("provenance")):
        if source and source.get("torch"):
            return source
    from chatforge.progress import provenance

    return provenance()


def stage_rows(data: dict) -> tuple[list[list[str]], float | None, float | None]:
    markers, rows = data["markers"], []
    durations = []
    for name in STAGES:
        marker = markers.get(name)
        if marker:
            durations.append(marker.get("duration_s") or 0.0)
            rows.append([name, "done", format_duration(marker.get("duration_s") or 0.0),
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(marker.get("started", 0)))])
        elif name in data["absent"]:
            rows.append([name, "module not in this checkout", "", ""])
        elif markers and name != "report":
            rows.append([name, NOT_RUN, "", ""])
    starts = [m["started"] for m in markers.values() if m and "started" in m]
    ends = [m["finished"] for m in markers.values() if m and "finished" in m]
    span = max(ends) - min(starts) if starts and ends else None
    return rows, (sum(durations) if durations else None), span


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg: no display needed)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """PNG bytes written atomically, so a reader never opens half an image."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    paths.atomic_write_bytes(path, buffer.getvalue())


def curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric in step order. A resumed run appends to the same metrics
    file and re-logs the steps after its checkpoint: the later line of a step is the one that counts."""
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float)) and "step" in r}
    return sorted(by_step.items())


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(curves: dict, key: str, ylabel: str, title: str, path: Path) -> bool:
    series = {stage: curve(rows, key) for stage, rows in curves.items()}
    series = {stage: pts for stage, pts in series.items() if pts}
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, pts in series.items():
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) < 50:
            ax.plot(steps, values, marker=".", label=stage)
            continue
        # small batches make per-step loss jumpy: show it faintly, with its moving average on top
        raw = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
        ax.plot(steps, _moving_average(values, window=max(5, len(pts) // 25)), color=raw.get_color(),
                label=f"{stage} (moving average)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def centered_table(data: dict) -> dict[str, dict[str, float | None]]:
    """metric -> stage -> centered score, (accuracy - chance) / (1 - chance): 0 is chance, 1 perfect.
    CORE and ChatCORE are centered already; a task result that records no chance level is left out."""
    table = {row: {stage: None for stage in CHAT_STAGES} for row in EVAL_ROWS}
    if data["core"]:
        table["CORE"]["base"] = data["core"].get("core")
    for stage, chat in data["chat"].items():
        for task, result in ((chat or {}).get("tasks") or {}).items():
            if task not in table:
                continue
            if result.get("centered") is not None:
                table[task][stage] = result["centered"]
            elif result.get("accuracy") is not None and result.get("baseline") is not None:
                table[task][stage] = (result["accuracy"] - result["baseline"]) / (1 - result["baseline"])
        if chat:
            table["ChatCORE"][stage] = chat.get("chatcore")
    return table


def chance_levels(data: dict) -> dict[str, float]:
    """task -> the accuracy of random guessing, as the chat evaluations recorded it."""
    levels = {}
    for chat in data["chat"].values():
        for task, result in ((chat or {}).get("tasks") or {}).items():
            if result.get("baseline") is not None:
                levels.setdefault(task, result["baseline"])
    return levels


def plot_evals(table: dict, path: Path) -> bool:
    """Centered scores by stage on one axis: accuracies and centered scores never share it."""
    rows = [row for row in EVAL_ROWS if any(v is not None for v in table[row].values())]
    stages = [s for s in CHAT_STAGES if any(table[row][s] is not None for row in rows)]
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / max(1, len(stages))
    for i, stage in enumerate(stages):
        xs = [x + i * width for x, row in enumerate(rows) if table[row][stage] is not None]
        values = [table[row][stage] for row in rows if table[row][stage] is not None]
        ax.bar(xs, values, width, label=stage)
    ax.set_xticks([x + width * (len(stages) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels(rows, rotation=30, ha="right")
    ax.set_ylabel("centered score (0 = chance, 1 = perfect)")
    ax.set_title("evaluations by stage: below 0 is worse than guessing")
    ax.axhline(0, color="black", linewidth=0.8, linestyle="--", label="chance")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def lineage_rows(lineage: list[dict]) -> list[list[str]]:
    rows = []
    for c in lineage:
        source = c["source"]
        started = (f"{source[0]}/{source[1]} step {source[2]}" if source and source[2] is not None
                   else f"{source[0]}/{source[1]}" if source else "scratch (random init)")
        metrics = ", ".join(f"{k} {fmt(v)}" for k, v in c["metrics"].items() if isinstance(v, (int, float))) or "none"
        rows.append([f"{c['stage']}/{c['tag']} step {c['step']}", started, str(c["data"]),
                     c["tokenizer"] or "tokenizer/ (unnamed, old layout)",
                     ", ".join(map(str, c["steps"])), metrics])
    return rows


def recorded_samples(data: dict, stage: str) -> list[str]:
    """A few 'prompt -> reply' lines the stages recorded for `stage`'s checkpoint."""
    if stage == "base":
        samples = (data["samples"] or {}).get("samples") or []
        if samples:
            return [f"{s['prompt']!r} -> {s['completion']!r}" for s in samples[:4]]
        logged = [r["samples"] for r in data["curves"]["base"] if r.get("samples")]
        return [repr(s) for s in logged[-1][:4]] if logged else []
    samples = (data["chat"].get(stage) or {}).get("samples") or []
    return [f"{s.get('prompt')!r} -> {s.get('reply')!r}" for s in samples[:4]]


# ---------------------------------------------------------------------------------------------
# the page as blocks


def build_blocks(data: dict, out_dir: Path, gpu_hour_cost: float) -> list[tuple]:
    blocks: list[tuple] = [("h", 1, f"chatforge report card: {data['tag']}")]
    blocks.append(("p", f"Preset: {data['preset'] or 'stages run by hand'}; tag {data['tag']}; generated "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')} from the stages' JSON files."))

    # machine and provenance
    prov = provenance_of(data)
    stage_table, total, span = stage_rows(data)
    world = (data["pretrain"] or {}).get("world_size") or 1
    gpu = prov.get("gpu")
    gpus = (prov.get("gpu_count") or world) if gpu else 0
    wall = span if span is not None else sum(
        (d or {}).get("wall_time_s") or 0.0 for d in (data["pretrain"], *data["train"].values()))
    cost = f"${gpus * wall / 3600 * gpu_hour_cost:,.2f} at ${gpu_hour_cost:.2f}/GPU-hour" if gpus else "n/a (no GPU)"
    blocks.append(("h", 2, "Machine and provenance"))
    blocks.append(("table", ["item", "value"], [
        ["host", fmt(prov.get("host"))], ["CPUs", fmt(prov.get("cpu_count"))],
        ["GPU", f"{gpus} x {gpu}" if gpu else "none"], ["python", fmt(prov.get("python"))],
        ["torch", fmt(prov.get("torch"))], ["CUDA", prov.get("cuda") or "none"],
        ["git commit", fmt(prov.get("git_commit"))],
        ["total wall clock", format_duration(wall) if wall else NOT_RUN],
        ["estimated cost", cost]]))

    if stage_table:
        blocks.append(("h", 2, "Stages"))
        blocks.append(("table", ["stage", "status", "duration", "started"], stage_table))
        if total is not None:
            blocks.append(("p", f"Sum of stage durations: {format_duration(total)}."))

    # the checkpoints on disk and where each came from
    blocks.append(("h", 2, "Checkpoints and lineage"))
    if data["lineage"]:
        blocks.append(("table", ["checkpoint", "started from", "data", "tokenizer", "steps on disk", "last metrics"],
                       lineage_rows(data["lineage"])))
        for c in data["lineage"]:
            if c["tag"] != data["tag"]:
                continue
            lines = recorded_samples(data, c["stage"])
            blocks.append(("p", f"Samples of {c['stage']}/{c['tag']}:" if lines else
                                f"Samples of {c['stage']}/{c['tag']}: none recorded (`chatforge "
                                f"{'eval base' if c['stage'] == 'base' else 'eval chat'} --source {c['stage']} "
                                f"--tag {c['tag']}` records some)."))
            if lines:
                blocks.append(("list", lines))
    else:
        blocks.append(("p", f"No checkpoint with tag {data['tag']} is on disk."))

    # tokenizer
    blocks.append(("h", 2, "Tokenizer"))
    tt, te = data["tokenizer_train"], data["tokenizer_eval"]
    if tt:
        blocks.append(("p", f"Vocabulary {fmt(tt.get('vocab_size'))} tokens, trained on {fmt(tt.get('characters'))} "
                            f"characters ({fmt(tt.get('documents'))} documents) in {fmt(tt.get('train_seconds'), 2)} s."))
    if te:
        rows = []
        for name, sample in (te.get("samples") or {}).items():
            ref = [fmt((sample.get(k) or {}).get("bytes_per_token"), 3, "n/a") for k in ("gpt2", "cl100k_base")]
            rows.append([name, fmt(sample.get("bytes")), fmt(sample["ours"]["tokens"]),
                         fmt(sample["ours"]["bytes_per_token"], 3), *ref])
        blocks.append(("table", ["text", "bytes", "tokens (ours)", "bytes/token (ours)", "GPT-2", "GPT-4"], rows))
    if not (tt or te):
        blocks.append(("p", f"Tokenizer: {NOT_RUN}."))

    # pretraining
    blocks.append(("h", 2, "Pretraining"))
    pt = data["pretrain"]
    if pt:
        flops = (pt.get("flops_per_token") or 0) * (pt.get("training_tokens") or 0)
        blocks.append(("table", ["item", "value"], [
            ["depth", fmt(pt.get("depth"))], ["parameters", fmt(pt.get("parameters"))],
            ["training tokens", fmt(pt.get("training_tokens"))], ["training FLOPs", f"{flops:.3e}"],
            ["steps", fmt(pt.get("num_iterations"))], ["time", format_duration(pt.get("wall_time_s") or 0)],
            ["tokens/s", fmt(pt.get("tok_per_s"), 1)],
            ["MFU %", fmt(pt.get("mfu"), 2) if pt.get("mfu") is not None else "n/a (no peak FLOPs for this device)"],
            ["final val bpb", fmt(pt.get("final_val_bpb"), missing=measured_or_why(pt, "final_val_bpb"))],
            ["CORE", fmt((data["core"] or {}).get("core"))]]))
    else:
        blocks.append(("p", f"Pretraining: {NOT_RUN}."))
    if plot_curves(data["curves"], "train_loss", "train loss", "training loss by stage", out_dir / "loss.png"):
        blocks.append(("img", "loss.png", "training loss"))
    if plot_curves({"base": data["curves"]["base"]}, "val_bpb", "val bits per byte", "pretraining val bpb",
                   out_dir / "bpb.png"):
        blocks.append(("img", "bpb.png", "validation bits per byte"))
    if data["bpb"]:
        bpb = data["bpb"]
        blocks.append(("p", f"Bits per byte of the final base model: train "
                            f"{fmt(bpb.get('train_bpb'), missing=measured_or_why(bpb, 'train_bpb'))}, "
                            f"val {fmt(bpb.get('val_bpb'), missing=measured_or_why(bpb, 'val_bpb'))}."))

    # CORE per task
    blocks.append(("h", 2, "CORE by task"))
    core = data["core"]
    if core:
        rows = [[task, fmt(r.get("num_items")), fmt(r.get("accuracy")), fmt(r.get("centered"))]
                for task, r in (core.get("tasks") or {}).items()]
        rows.append(["CORE", "", "", fmt(core.get("core"))])
        blocks.append(("table", ["task", "items", "accuracy", "centered"], rows))
    else:
        blocks.append(("p", f"CORE: {NOT_RUN}."))

    # evaluations by stage
    table, chance = eval_table(data), chance_levels(data)
    blocks.append(("h", 2, "Evaluations by stage"))
    blocks.append(("table", ["metric", "chance", *CHAT_STAGES],
                   [[row, "0 (centered)" if row in ("CORE", "ChatCORE") else fmt(chance.get(row), missing="n/a"),
                     *(fmt(table[row][s]) for s in CHAT_STAGES)] for row in EVAL_ROWS]))
    blocks.append(("p", "The tasks are accuracies, next to the accuracy of guessing; CORE and ChatCORE are centered "
                        "(0 = chance, 1 = perfect). The chart puts every score on the centered scale."))
    if plot_evals(centered_table(data), out_dir / "evals.png"):
        blocks.append(("img", "evals.png", "centered scores by stage"))

    # training summaries of the chat stages
    rows = []
    for stage, summary in data["train"].items():
        if summary:
            rows.append([stage, fmt(summary.get("num_iterations")),
                         fmt(summary.get("final_train_loss"), missing=measured_or_why(summary, "final_train_loss")),
                         fmt(summary.get("final_val_loss"), missing=measured_or_why(summary, "final_val_loss")),
                         format_duration(summary.get("wall_time_s") or 0)])
        else:
            rows.append([stage, NOT_RUN, "", "", ""])
    blocks.append(("h", 2, "Midtraining, SFT, RL"))
    blocks.append(("table", ["stage", "steps", "final train loss", "final val loss", "time"], rows))

    notes = list(((data["markers"].get("data") or {}).get("sources") or {}).get("notes") or []) + data["gone"]
    if data["absent"]:
        notes.append(f"stages whose module is not in this checkout: {', '.join(data['absent'])}")
    for source in (core, *data["chat"].values()):
        if source and source.get("note"):
            notes.append(source["note"])
    if notes:
        blocks.append(("h", 2, "Notes"))
        blocks.append(("list", list(dict.fromkeys(notes))))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "list":
            out.extend(f"- {item}" for item in block[1])
        out.append("")
    return "\n".join(out)


def to_html(blocks: list[tuple], out_dir: Path) -> str:
    e = html.escape
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{e(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(c))}</th>" for c in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            encoded = base64.b64encode((out_dir / block[1]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{e(block[2])}" src="data:image/png;base64,{encoded}">')
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>chatforge report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# the stage


def add_arguments(parser) -> None:
    parser.add_argument("--html", action="store_true", help="also write report.html (one self-contained page)")
    parser.add_argument("--tag", default=None, help="checkpoint tag to report on (default: the speedrun's, "
                                                    "else the most recent base eval)")
    parser.add_argument("--preset", default=None, help="speedrun whose stage markers to read (default: the latest)")
    parser.add_argument("--gpu-hour-cost", type=float, default=2.5,
                        help="dollars per GPU-hour for the cost estimate (default 2.5)")


def main(args) -> Path:
    if args.gpu_hour_cost < 0:
        raise UsageError(f"--gpu-hour-cost {args.gpu_hour_cost} must be 0 or more")
    out_dir = paths.report_dir()
    data = collect(args.tag, args.preset)
    blocks = build_blocks(data, out_dir, args.gpu_hour_cost)
    report = out_dir / "report.md"
    paths.atomic_write_text(report, to_markdown(blocks))
    print0(f"wrote {report}")
    if args.html:
        page = out_dir / "report.html"
        paths.atomic_write_text(page, to_html(blocks, out_dir))
        print0(f"wrote {page}")
    return report
