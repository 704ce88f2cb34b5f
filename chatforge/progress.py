"""Showing long work and recording what happened: progress bars, periodic lines, metrics JSONL, wandb.

On a terminal a bar shows rate and ETA; when output goes to a file (a log, CI) a plain line is
printed every `interval` seconds instead, and whenever a stage calls `report()` (after an eval);
ranks other than 0 stay quiet either way. The rate and ETA of those lines leave out the first
`warmup` updates: a training run's first steps include torch.compile and would otherwise put hours
on the ETA of a run that has minutes left.
Every run writes runs/<run-id>/metrics.jsonl plus meta.json with the provenance of its numbers
(arguments, git commit, torch/CUDA versions, GPU name). wandb is used only when asked for.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from chatforge import paths
from chatforge.errors import UsageError
from chatforge.runtime import is_rank0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_figure(value: float | None, why_not: str, digits: int = 4) -> str:
    """A measured figure, or why it was not measured: a summary never says "None" for a skipped eval."""
    return f"{value:.{digits}f}" if value is not None else f"not measured ({why_not})"


def not_measured(figures: dict, reasons: dict) -> dict:
    """{name: reason} for each of `figures` that is None, for a summary JSON and the report to quote."""
    return {name: reasons[name] for name, value in figures.items() if value is None and name in reasons}


class Progress:
    """A bar on a TTY, a periodic line otherwise, nothing on non-zero ranks."""

    def __init__(self, total: float | None, desc: str, unit: str = "it", interval: float = 30.0,
                 unit_scale: bool = False, stream=None, initial: float = 0, warmup: int = 0, clock=None):
        """initial: where a resumed run starts counting; warmup: updates left out of the rate and ETA;
        clock: seconds, monotonic (time.monotonic; tests pass a fake)."""
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = interval
        self.count = float(initial)
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.last_line = self.start
        self.warmup = warmup
        self.updates = 0
        self.timed_from = (self.start, self.count) if warmup <= 0 else None  # (time, count) the rate starts at
        self.postfix: dict = {}
        self.stream = stream or sys.stderr
        self.enabled = is_rank0()
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            file=self.stream, dynamic_ncols=True)

    def update(self, n: float = 1, **postfix) -> None:
        self.count += n
        self.updates += 1
        if self.updates == self.warmup:
            self.timed_from = (self.clock(), self.count)
        if postfix:
            self.postfix = postfix
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        if self.clock() - self.last_line >= self.interval:
            self.report()

    def report(self) -> None:
        """A line now, with the latest postfix (off a TTY; the bar already shows it on one)."""
        if not self.enabled or self.bar is not None:
            return
        self.last_line = self.clock()
        print(self.line(self.postfix), file=self.stream, flush=True)

    def rate(self) -> float | None:
        """Units per second since the warmup updates; None until they are done."""
        if self.timed_from is None:
            return None
        since, count = self.timed_from
        elapsed = self.clock() - since
        return (self.count - count) / elapsed if elapsed > 0 and self.count > count else None

    def line(self, postfix: dict | None = None) -> str:
        parts = [f"{self.desc}: {self.unit} {self.count:,.0f}" if self.unit == "step"
                 else f"{self.desc}: {self.count:,.0f}"]
        rate = self.rate()
        if self.total:
            parts[0] += f"/{self.total:,.0f} ({100 * self.count / self.total:.0f}%)"
            parts.append(f"eta {format_duration((self.total - self.count) / rate) if rate else '?'}")
        parts.append(f"{rate:,.1f} {self.unit}/s" if rate is not None else f"? {self.unit}/s")
        parts.extend(f"{k} {v}" for k, v in (postfix or {}).items())
        return " | ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line() + f" | done in {format_duration(self.clock() - self.start)}",
                  file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """What a reader needs to trust a number: code version, software and hardware."""
    import torch

    info = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


class MetricsLogger:
    """One JSONL line per `log` call under runs/<run-id>/, mirrored to wandb when asked for."""

    def __init__(self, stage: str, args: dict | None = None, run_id: str | None = None,
                 wandb_run: str | None = None):
        self.enabled = is_rank0()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_id = paths.safe_name(run_id or f"{stage}-{stamp}")
        self.dir = paths.runs_dir() / self.run_id
        self.path = self.dir / "metrics.jsonl"
        self.wandb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"stage": stage, "run_id": self.run_id, "args": args or {}, **provenance()}
        paths.atomic_write_text(self.dir / "meta.json", json.dumps(meta, indent=2, default=str))
        if wandb_run:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
            self.wandb = wandb.init(project="chatforge", name=wandb_run, config=meta)

    def log(self, step: int | None = None, **metrics) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **({"step": step} if step is not None else {}), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
