"""`jaxaccel accelerate`'s outputs from a report dict: report.json (versioned; its schema is
accelerate_report.schema.json, shipped beside this module), report.md (the table and the
choice), report.png (speed against quality loss, the Pareto front drawn, the choice marked) and
the rich table printed at the end, the progress bar while measuring, and which folders `--out` may
replace. Pure presentation: nothing here measures or chooses."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA = Path(__file__).with_name("accelerate_report.schema.json")
EXTERNAL = "external baseline"  # a row's "kind" when it is not a jaxaccel variant (never chosen)
OUTPUTS = ("model", "report.json", "report.md", "report.png")  # what `write` (and the chosen folder) put in --out


def not_an_output(folder: Path) -> str | None:
    """Why a non-empty `folder` is not an earlier accelerate output (None: it is one, safe to replace)."""
    other = sorted(p.name for p in folder.iterdir() if p.name not in OUTPUTS)
    if other:
        return f"it holds {', '.join(other[:4])}{', ...' if len(other) > 4 else ''}"
    try:
        report = json.loads((folder / "report.json").read_text())
        ours = isinstance(report, dict) and isinstance(report.get("schema_version"), int) and "rows" in report
    except (OSError, ValueError):
        ours = False
    return None if ours else "it has no report.json that accelerate wrote"


def check_out(out, overwrite: bool = False) -> Path:
    """Refuse `out` before any work: a file, a folder that cannot be written, or a non-empty folder
    that is not an earlier accelerate output (unless `overwrite`). An earlier output is replaced
    (atomically, when the new one is complete)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite and (why := not_an_output(out)):
        raise FileExistsError(f"--out {out} is not empty and is not an earlier `jaxaccel accelerate` output ({why}); "
                              "choose another folder, or pass --overwrite to replace it")
    parent = out.parent if out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} cannot be written: {parent} is not a writable folder")
    return out


def rate(row: dict, task: str, batch: int) -> float:
    """The speed the choice ranks by: decode tokens/s (generate) or sentences/s (embed, classify)."""
    s = row["speed"][str(batch)]  # JSON's keys: the batch size as a string
    return s["decode_tok_s"] if task == "generate" else s["sentences_s"]


def quality_loss(row: dict, task: str) -> float | None:
    """Lower is better: mean KL (generate), 1 - mean cosine (embed), accuracy drop in points
    (classify); None for a row that could not measure it (llama.cpp: top-1 agreement only)."""
    q = row["quality"]
    value = q.get({"generate": "kl_mean", "embed": "cos_mean", "classify": "accuracy_drop_points"}[task])
    if value is None:  # not measurable for that row, or non-finite outputs (null in the report)
        return None
    return 1.0 - value if task == "embed" else value


def json_safe(x):
    """`x` with every non-finite float (NaN, inf) as None: JSON has no NaN (json.dumps would write
    a bare `NaN`, which JSON parsers refuse); the report says why a figure is missing."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _num(fmt: str, x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def measured(report: dict) -> list[dict]:
    return [r for r in report["rows"] if "skipped" not in r]


def pareto(report: dict) -> list[str]:
    """The jaxaccel variants no other variant beats on both speed and quality loss, fastest first
    (the kernels-off comparison rows are not candidates, so not on it)."""
    task, batch = report["task"], report["batch"]
    pts = [(rate(r, task, batch), quality_loss(r, task), r["variant"]) for r in measured(report)
           if r["kind"] != EXTERNAL and r.get("kernels") != "xla" and quality_loss(r, task) is not None]
    front, best_loss = [], float("inf")
    for speed, loss, name in sorted(pts, key=lambda p: (-p[0], p[1])):
        if loss < best_loss:
            front.append(name)
            best_loss = loss
    return front


def machine() -> dict:
    """What the numbers were measured on (the report's header)."""
    import jax

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}


def _columns(task: str) -> list[str]:
    speed = {"generate": ["tok/s", "TTFT ms"], "embed": ["sent/s", "p50 ms"], "classify": ["sent/s", "p50 ms"]}[task]
    quality = {"generate": ["KL mean", "KL p99", "top-1", "ppl Δ%"], "embed": ["cos mean", "cos min"],
               "classify": ["accuracy", "Δ points", "agreement"]}[task]
    return ["variant", *speed, "compile s", "params MiB", "peak MiB", *quality, "verdict"]


def _cells(r: dict, task: str, batch: int) -> list[str]:
    s, q = r["speed"][str(batch)], r["quality"]
    latency = s["ttft_s"] if task == "generate" else s["latency_p50_s"]
    cells = [_num("{:.1f}", rate(r, task, batch)), _num("{:.0f}", None if latency is None else 1e3 * latency),
             _num("{:.1f}", s["compile_s"]), f"{r['params_bytes'] / 2**20:.1f}", f"{r['memory']['peak_rss_bytes'] / 2**20:.0f}"]
    keys = {"generate": [("kl_mean", "{:.4f}"), ("kl_p99", "{:.4f}"), ("top1_agreement", "{:.1%}"),
                         ("ppl_delta_pct", "{:+.2f}")],
            "embed": [("cos_mean", "{:.5f}"), ("cos_min", "{:.5f}")],
            "classify": [("accuracy", "{:.1%}"), ("accuracy_drop_points", "{:+.1f}"), ("agreement", "{:.1%}")]}[task]
    return cells + [_num(fmt, q.get(k)) for k, fmt in keys]  # n/a: not measurable for that row, or non-finite


def rows_as_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    task, batch = report["task"], report["batch"]
    cols = _columns(task)
    out = []
    for r in report["rows"]:
        name = r["variant"] + (" (external)" if r["kind"] == EXTERNAL else "")
        if "skipped" in r:
            out.append([name, *[""] * (len(cols) - 2), r["skipped"]])
        else:
            out.append([name, *_cells(r, task, batch), r["verdict"]])
    return cols, out


def batch_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Every measured row at every batch size asked for, one line each (the main table shows the
    batch that decides the choice)."""
    task = report["task"]
    cols = ["variant", "batch", "tok/s" if task == "generate" else "sent/s",
            "TTFT ms" if task == "generate" else "compile s", "p50 ms", "p90 ms"]
    out = []
    for r in measured(report):
        for b in report["batch_sizes"]:
            s = r["speed"].get(str(b))
            if s is None:  # llama.cpp's row: batch 1 only
                out.append([r["variant"], str(b), "n/a", "n/a", "n/a", "n/a"])
                continue
            second = s.get("ttft_s") if task == "generate" else s["compile_s"]
            ms = lambda x: _num("{:.0f}", None if x is None else 1e3 * x)
            out.append([r["variant"], str(b), _num("{:.1f}", rate(r, task, b)),
                        ms(second) if task == "generate" else _num("{:.1f}", second),
                        ms(s["latency_p50_s"]), ms(s["latency_p90_s"])])
    return cols, out


def title(report: dict) -> str:
    return f"jaxaccel accelerate ({report['task']}); chosen: {report['chosen'] or 'nothing'}"


def table(report: dict) -> str:
    """The report as a rich table (text), and a second one of every batch size when several were asked for."""
    from rich.console import Console
    from rich.table import Table

    tables = [(title(report), *rows_as_cells(report))]
    if len(report["batch_sizes"]) > 1:
        tables.append(("speed at each batch size", *batch_rows(report)))
    console = Console(width=180, record=True)
    with console.capture() as cap:
        for name, cols, rows in tables:
            t = Table(title=name)
            for col in cols:
                t.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
            for cells in rows:
                t.add_row(*cells)
            console.print(t)
    return cap.get()


def markdown(report: dict) -> str:
    cols, rows = rows_as_cells(report)
    m = report["machine"]
    lines = [f"# {title(report)}", "",
             f"Model: `{report['model']}`. Machine: {m['processor']}, {m['cpu_count']} CPUs, jax {m['jax']} on "
             f"{m['jax_backend']} ({', '.join(sorted(set(m['devices'])))}); {m['platform']}.", "",
             f"Quality budget: {report['budget']['text']}. Speed at batch {report['batch']} decides "
             f"(batch sizes measured: {', '.join(map(str, report['batch_sizes']))}); quality on {report['eval']['what']}. "
             f"Peak memory: the process's resident high-water mark while each variant ran "
             f"({report['memory_method']}).", ""]
    if report.get("time_budget_s") is not None:
        lines += [f"Time budget: {report['time_budget_s'] / 60:g} min for measuring ({report['measure_s']:.0f} s used); "
                  "rows that would not have fitted are skipped for time.", ""]
    if report["interrupted"]:
        lines += ["**Interrupted**: the rows below are those measured before Ctrl-C.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    if len(report["batch_sizes"]) > 1:
        bcols, brows = batch_rows(report)
        lines += ["", "Speed at each batch size:", "", "| " + " | ".join(bcols) + " |", "|" + "---|" * len(bcols)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in brows]
    lines += ["", f"Choice: {report['reason']}", "", f"Pareto front (speed vs quality loss): "
              f"{', '.join(report['pareto']) or 'none'}.", ""]
    notes = [f"{r['variant']}: {r['external']}" + (f"; {r['quality']['partial']}" if "partial" in r["quality"] else "")
             for r in measured(report) if r["kind"] == EXTERNAL]
    lines += [f"External baselines: {'; '.join(notes)}.", ""] if notes else []
    bad = [f"{r['variant']}: {r['quality']['non_finite']}" for r in measured(report) if "non_finite" in r["quality"]]
    lines += [f"Rejected for non-finite outputs (their figures are null in report.json): {'; '.join(bad)}.", ""] if bad else []
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Speed against quality loss for every measured row: the Pareto front as a line, the choice
    in red, the external baseline as a gray square, the budget as a dashed line where it has an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, batch = report["task"], report["batch"]
    floor = 1e-6  # exact variants (speculative, eager) sit here on the log axes
    y = (lambda r: quality_loss(r, task)) if task == "classify" else (lambda r: max(quality_loss(r, task), floor))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = {r["variant"]: (rate(r, task, batch), y(r), r["kind"]) for r in measured(report)
           if quality_loss(r, task) is not None}
    for name, (x, v, kind) in pts.items():
        chosen = name == report["chosen"]
        ax.scatter(x, v, s=90 if chosen else 30, marker="s" if kind == EXTERNAL else "o",
                   c="tab:red" if chosen else ("tab:gray" if kind == EXTERNAL else "tab:blue"), zorder=3)
        ax.annotate(name, (x, v), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = [pts[n] for n in report["pareto"]]
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:green", linewidth=1,
                label="Pareto front")
    b = report["budget"]
    limit = {"kl": lambda: b["limit"], "cos": lambda: 1.0 - b["limit"], "acc": lambda: b["limit"]}.get(b["metric"])
    if limit is not None:  # a perplexity budget has no axis here
        ax.axhline(limit(), color="tab:gray", linestyle="--", linewidth=1, label="quality budget")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    if task != "classify":
        ax.set_yscale("log")
    ax.set_xlabel(("decode tokens/s" if task == "generate" else "sentences/s") + f" (batch {batch})")
    ax.set_ylabel({"generate": f"mean KL vs float32 ({floor:g}: exact)", "embed": f"1 - mean cosine vs float32 ({floor:g}: exact)",
                   "classify": "accuracy drop vs float32 (points)"}[task])
    ax.set_title(title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(report: dict, folder: Path) -> str:
    """report.json, report.md and report.png into `folder`; -> the rich table's text. Non-finite
    numbers are written as null (`json_safe`)."""
    report = json_safe(report)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str, allow_nan=False))
    (folder / "report.md").write_text(markdown(report))
    plot(report, folder / "report.png")
    return table(report)


class Progress:
    """What `accelerate.plan` reports while it measures: which variant (n of total) and its current
    step. This one shows nothing (tests, the API, output that is not a terminal)."""

    def variant(self, n: int, total: int, name: str) -> None:
        pass

    def step(self, text: str) -> None:
        pass


class _RichProgress(Progress):
    def __init__(self, bar):
        self.bar, self.task, self.name = bar, None, ""

    def variant(self, n: int, total: int, name: str) -> None:
        if self.task is None:
            self.task = self.bar.add_task("", total=total)
        self.name = name
        self.bar.update(self.task, total=total, completed=max(n - 1, 0), description=f"{min(n, total)}/{total} {name}")

    def step(self, text: str) -> None:
        task = self.bar.tasks[0]
        self.bar.update(self.task, description=f"{task.completed + 1:.0f}/{task.total:.0f} {self.name}: {text}")


@contextlib.contextmanager
def progress_bar(enabled: bool, console=None):
    """A rich progress bar on stderr (or `console`) while measuring, gone when done (the log lines
    and the table stay); `enabled` False yields the silent Progress."""
    if not enabled:
        yield Progress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    bar = Bar(TextColumn("accelerate"), BarColumn(bar_width=24), TextColumn("{task.description}"),
              TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
    with bar:
        yield _RichProgress(bar)
