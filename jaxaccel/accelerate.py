"""`jaxaccel accelerate`: measure a model's acceleration variants on this machine, keep the fastest
one within a quality budget, save it, and report every variant (report.json / .md / .png).

Variants (those that apply; accelerate_variants.py says what each is and builds it): float32 eager
(un-jitted, what a newcomer writes), float32 jit, bfloat16, float16, int8 per channel and per
group, int8 weights with an int8 KV cache (its quality scored through the cache), int4 per group
(two group sizes), w8a8, speculative decoding with prompt lookup or an int8 self-draft (greedy:
float32's quality by construction), the fastest integer variant again through XLA's ops instead of
the CPU kernels (what the kernels buy; never chosen), the GGUF file's own quantized tensors as
stored when the source is a GGUF (accelerate_variants.py), and with more than one device float32 over
each mesh layout (data, fsdp, tensor). Encoders (embed, classify) get float32 jit, bfloat16,
float16, int8 and w8a8 (and the mesh layouts). Each batch size asked for is measured for every row;
the first decides the choice.
External baseline rows, never chosen: transformers eager on the same weights when torch is
installed (accelerate_baseline.py), and llama.cpp's llama-server on the source GGUF file when a
built one is found (accelerate_llama.py); otherwise the row says why it is absent.

Speed is measured warm per batch size (accelerate_measure.py): compile time, time to first token,
decode tokens/s or sentences/s, p50 / p90 latency, params bytes and the process's peak resident
memory while the variant ran. Quality is against float32: for language models on a held-out text
shipped with the package (eval_data/heldout.txt, never used to tune anything) the next-token KL
(mean, 99th percentile), top-1 agreement and perplexity change; for embeddings the cosine; for
classifiers the accuracy on the user's labelled `--eval` rows (and agreement with float32's labels).

The choice is the fastest variant (at the first batch size) within the budget that beats float32
jit; the others are listed with the reason. When nothing qualifies the report says so and float32
jit is kept. Ctrl-C stops measuring: the rows measured so far are still chosen from and written.

Order and time: float32 jit first (every other row is compared with it), then the variants
cheapest first by an estimated cost relative to float32 jit's measured time, the un-jitted one
and the external rows last; under a time budget a row whose estimate does not fit what is left is
skipped for time, so a short budget still measures the cheap (and usually fastest) variants.
The output folder (`--out`, by default ./accelerated/<model name>) may be new, empty or an earlier
accelerate output, which is replaced atomically; anything else is refused before measuring.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import accelerate_baseline, accelerate_llama
from . import accelerate_measure as measure
from . import accelerate_report as report_out
from .accelerate_variants import (BASELINE, Variant, build, encoder_variants, kernels_off_twin, lm_variants,
                                  variant_named, variants_for)
from .quant import QuantConfig

_EXPORTED = (encoder_variants, lm_variants)  # part of this module's surface (tests, bench)

HELDOUT = Path(__file__).with_name("eval_data") / "heldout.txt"
TASKS = ("generate", "embed", "classify")


@dataclass(frozen=True)
class External:
    """An external baseline row: `measure(model, ref)` -> the row's measurements, or NotMeasured."""

    name: str
    measure: Callable
    cost: float


@dataclass(frozen=True)
class Budget:
    """The quality a variant must keep: `metric` ("kl": mean next-token KL <= limit, "ppl":
    perplexity increase <= limit percent, "cos": mean cosine >= limit, "acc": accuracy at most
    `limit` percentage points below float32's)."""

    metric: str
    limit: float

    ALLOWED = {"generate": ("kl", "ppl"), "embed": ("cos",), "classify": ("acc",)}
    DEFAULT = {"generate": "kl:0.02", "embed": "cos:0.995", "classify": "acc:1"}

    @staticmethod
    def parse(text: str | None, task: str) -> "Budget":
        """"kl:0.02", "ppl:2%" (or "2%"), "cos:0.995", "acc:0.5" (points), or a bare number (the
        task's own metric); None: the task's default (Budget.DEFAULT)."""
        if task not in TASKS:
            raise ValueError(f"--task {task}: expected one of {', '.join(TASKS)}")
        text = text if text is not None else Budget.DEFAULT[task]
        metric, _, value = text.strip().lower().rpartition(":")
        allowed = Budget.ALLOWED[task]
        if not metric:
            metric = "ppl" if value.endswith("%") and task == "generate" else allowed[0]
        try:
            limit = float(value.rstrip("%"))
        except ValueError:
            limit = math.nan
        top = {"cos": 1.0, "acc": 100.0}.get(metric, math.inf)
        if metric not in allowed or not math.isfinite(limit) or not 0 <= limit <= top:
            raise ValueError(f"--quality-budget {text!r} for --task {task}: expected "
                             f"{' or '.join(m + ':N' for m in allowed)} (e.g. kl:0.02, ppl:2%, cos:0.995, acc:0.5)")
        return Budget(metric, limit)

    def holds(self, quality: dict) -> bool:
        return {"kl": lambda: quality["kl_mean"] <= self.limit, "ppl": lambda: quality["ppl_delta_pct"] <= self.limit,
                "cos": lambda: quality["cos_mean"] >= self.limit,
                "acc": lambda: quality["accuracy_drop_points"] <= self.limit}[self.metric]()

    def __str__(self) -> str:
        return {"kl": f"mean KL <= {self.limit:g}", "ppl": f"perplexity +{self.limit:g}% at most",
                "cos": f"mean cosine >= {self.limit:g}",
                "acc": f"accuracy at most {self.limit:g} point{'' if self.limit == 1 else 's'} below float32's"}[self.metric]


def parse_batch_sizes(text: str | None, task: str) -> list[int]:
    """"1,8" -> [1, 8]; None: 1 for generate, 32 for the encoder tasks."""
    text = text if text is not None else ("1" if task == "generate" else "32")
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers separated by commas, got {text!r}")
    return sizes


def check_arguments(task: str, model_arg: str | None, eval_path) -> measure.LabelledRows | None:
    """The checks that need no model: --eval goes with --task classify, which needs a --model.
    -> the labelled rows (classify) or None."""
    if task != "classify":
        if eval_path is not None:
            raise ValueError(f"--eval is for --task classify (accuracy on labelled rows); --task {task} "
                             "measures quality on the shipped held-out text")
        return None
    if model_arg is None:
        raise ValueError("--task classify needs --model: a sequence-classifier folder "
                         "(e.g. from `jaxaccel finetune --task classify`)")
    if eval_path is None:
        raise ValueError("--task classify needs --eval FILE: JSONL rows {\"text\": ..., \"label\": ...}")
    return measure.read_eval(eval_path)


def externals(task: str, source: str | None) -> list[External]:
    """llama.cpp on the source GGUF (generate), then transformers on the same weights."""
    llama = External(accelerate_llama.NAME, functools.partial(accelerate_llama.llama_cpp_baseline, source=source), 1.0)
    hf = External(accelerate_baseline.NAME, accelerate_baseline.transformers_baseline, 2.0)
    return [llama, hf] if task == "generate" else [hf]


class Reference:
    """float32's outputs on the task's evaluation data, and how to measure one variant against them."""

    def __init__(self, model, task: str, batch_sizes, new_tokens: int, windows: int, window: int, repeats: int,
                 eval_rows: measure.LabelledRows | None):
        self.task, self.batch_sizes, self.new_tokens, self.repeats = task, list(batch_sizes), new_tokens, repeats
        text = HELDOUT.read_text()
        if task == "generate":
            self.windows = measure.lm_windows(model.tokenizer, text, window, windows)
            self.ref = [measure.log_probs(model, r) for r in self.windows]
            self.prompt = model.tokenizer.decode(self.windows[0][1:33].tolist())
            self.what = f"{len(self.windows)} windows of {window} tokens of jaxaccel/eval_data/heldout.txt"
        elif task == "embed":
            self.sentences = measure.heldout_sentences(text)
            self.ref = None  # float32 jit's embeddings, once measured (it is measured first)
            self.what = f"{len(self.sentences)} sentences of jaxaccel/eval_data/heldout.txt"
        else:
            self.items, self.gold = eval_rows.items, measure.label_names(eval_rows, model.config.labels)
            self.ref = None  # float32 jit's predictions, once measured (it is measured first)
            self.what = f"{len(self.items)} labelled rows of {eval_rows.source}"

    def measure(self, m, v: Variant, step: Callable[[str], None] = lambda text: None) -> dict:
        """-> the row's quality, speed (per batch size, keys as strings) and, for classify,
        predictions; `step` is told what is being measured (the progress bar)."""
        sizes = self.batch_sizes
        speed_at = lambda b: step(f"speed at batch {b}") or b
        if self.task == "generate":
            exact = {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "ppl_delta_pct": 0.0,
                     "exact": "greedy decoding equals float32's"}
            if not (v.eager or v.speculative):
                step("quality on the held-out windows")
            quality = exact if v.eager or v.speculative else measure.lm_quality(self.ref, m, self.windows)
            n = min(self.new_tokens, 2) if v.eager else self.new_tokens  # un-jitted: the first token and one decode step
            runs = {str(b): measure.lm_speed(m, self.prompt, speed_at(b), n, self.repeats, v.speculative, v.eager)
                    for b in sizes}
            return {"quality": quality, "speed": {b: speed for b, (speed, _) in runs.items()},
                    "greedy_text": runs[str(sizes[0])][1]}
        # encoders: speed first, so that its first call is the one that compiles (compile_s)
        if self.task == "embed":
            speed = {str(b): measure.encoder_speed(m, self.sentences, speed_at(b), self.repeats) for b in sizes}
            step("quality on the held-out sentences")
            quality, got = measure.encoder_quality(self.ref, m, self.sentences)
        else:
            speed = {str(b): measure.classify_speed(m, self.items, speed_at(b), self.repeats) for b in sizes}
            step("accuracy on the --eval rows")
            quality, got = measure.classify_quality(m, self.items, self.gold, self.ref, sizes[0])
        if self.ref is None and v.name == BASELINE:
            self.ref = got
        row = {"quality": quality, "speed": speed}
        return row if self.task == "embed" else {**row, "predictions": got}


def plan(model, task: str, budget: Budget, batch_sizes=(1,), new_tokens: int = 32, windows: int = 4,
         window: int = 128, repeats: int = 2, time_budget_s: float | None = None,
         variants: list[Variant] | None = None, eval_rows: measure.LabelledRows | None = None,
         external: bool = True, source: str | None = None, log: Callable[[str], None] = print,
         progress: report_out.Progress | None = None) -> dict:
    """Measure float32 jit (the reference), then the other variants cheapest first (Variant.cost;
    float32 eager last), then the external baselines; -> the report (rows, choice, reason).
    Nothing is saved here.

    `time_budget_s` counts from here (float32's reference outputs included): a row whose estimated
    cost (its `cost` x float32 jit's measured time) does not fit in what is left is skipped for
    time. `source` (the --model argument) tells the llama.cpp row which GGUF file to run."""
    measure.check_task(model, task)
    progress = progress or report_out.Progress()
    # float32 jit first (the reference); the kernels-off row once the integer variants it repeats are
    # measured; the un-jitted one last of ours: it is never faster, so never chosen
    jobs = sorted(variants or variants_for(task, source=source),
                  key=lambda v: (v.name != BASELINE, v.eager, v.kernels_off, v.cost))
    jobs += externals(task, source) if external else []
    started = time.perf_counter()
    progress.variant(0, len(jobs), "float32's reference outputs")
    ref = Reference(model, task, batch_sizes, new_tokens, windows, window, repeats, eval_rows)
    rows, interrupted, unit = [], False, None  # unit: float32 jit's measured seconds
    identity = lambda j: j.identity() if isinstance(j, Variant) else {
        "variant": j.name, "kind": report_out.EXTERNAL, "quant": None, "speculative": None}
    unresolved = lambda j: isinstance(j, Variant) and j.kernels_off and j.same_as is None
    try:  # Ctrl-C anywhere in here keeps the rows measured so far
        for n, job in enumerate(jobs, 1):
            if unresolved(job):  # the kernels-off row repeats the fastest integer variant measured so far
                job = jobs[n - 1] = kernels_off_twin(rows, jobs, lambda r: report_out.rate(r, task, batch_sizes[0])) or job
            row = identity(job)
            rows.append(row)
            progress.variant(n, len(jobs), job.name)
            left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - started)
            if left is not None and unit is not None and job.cost * unit > left:
                row["skipped"] = f"skipped for time (needs about {job.cost * unit:.0f} s, {max(left, 0):.0f} s left)"
            elif unresolved(job):
                row["skipped"] = "not measured: no integer variant was measured to compare the kernels with"
            else:
                t0 = time.perf_counter()
                try:
                    with measure.PeakMemory() as mem:
                        if isinstance(job, External):
                            progress.step("measuring")
                            row.update(job.measure(model, ref))
                        else:
                            m = build(model, job, progress.step, source)
                            row["params_bytes"] = m.params_bytes
                            if job.gguf_as_stored:  # its QuantConfig is the file's (each weight's ggml type)
                                row["quant"] = json.loads(m.quant.to_json())
                            row.update(ref.measure(m, job, progress.step))
                            del m
                    row.setdefault("memory", mem.as_dict())  # llama.cpp's row has its server's own
                except (ValueError, TypeError, NotImplementedError, RuntimeError, OSError) as e:  # a row this model cannot have
                    why = str(e) if isinstance(e, accelerate_baseline.NotMeasured) else f"{type(e).__name__}: {e}"
                    row.clear()
                    row.update(identity(job), skipped=why)
                if job.name == BASELINE and "skipped" not in row:
                    unit = time.perf_counter() - t0
            log(f"  {row['variant']}: " + (row.get("skipped") or summary(row, task, batch_sizes[0])))
        progress.variant(len(jobs) + 1, len(jobs), "done")
    except KeyboardInterrupt:
        interrupted = True
        if rows and "skipped" not in rows[-1] and "memory" not in rows[-1]:  # the one being measured
            rows[-1] = {**identity(jobs[len(rows) - 1]), "skipped": "interrupted (Ctrl-C) while being measured"}
        rows += [{**identity(j), "skipped": "not measured: interrupted (Ctrl-C)"} for j in jobs[len(rows):]]
        log(f"  interrupted: {sum('memory' in r for r in rows)} rows measured")
    methods = {r["memory"]["method"] for r in rows if "memory" in r}
    report = choose(rows, task, budget, batch_sizes[0], interrupted)
    report.update(batch_sizes=list(batch_sizes), memory_method=methods.pop() if methods else "none",
                  time_budget_s=time_budget_s, measure_s=time.perf_counter() - started,
                  eval={"what": ref.what, "rows": len(ref.items) if task == "classify" else None,
                        "prompt": ref.prompt if task == "generate" else None})
    return report


def summary(row: dict, task: str, batch: int) -> str:
    q = row["quality"]
    if "non_finite" in q:
        return f"rejected: {q['non_finite']}"
    shown = {"generate": [("KL", "kl_mean", "{:.4f}"), ("top-1", "top1_agreement", "{:.1%}")],
             "embed": [("cos", "cos_mean", "{:.5f}")],
             "classify": [("accuracy", "accuracy", "{:.1%}"), ("agreement", "agreement", "{:.1%}")]}[task]
    quality = ", ".join(f"{label} {fmt.format(q[k])}" for label, k, fmt in shown if k in q)  # llama.cpp: top-1 only
    unit = "tok/s" if task == "generate" else "sentences/s"
    return f"{report_out.rate(row, task, batch):.1f} {unit}, {quality}"


def choose(rows: list[dict], task: str, budget: Budget, batch: int, interrupted: bool = False) -> dict:
    """The fastest jaxaccel row within the budget that beats float32 jit; every other row gets its
    reason. Interrupted before float32 jit was measured: nothing is chosen (chosen None)."""
    rate = lambda r: report_out.rate(r, task, batch)
    base = next((r for r in rows if r["variant"] == BASELINE and "skipped" not in r), None)
    head = {"schema_version": report_out.SCHEMA_VERSION, "task": task,
            "budget": {**dataclasses.asdict(budget), "text": str(budget)}, "batch": batch, "rows": rows,
            "interrupted": interrupted}
    if base is None:
        if not interrupted:
            raise RuntimeError("float32 jit, the reference every variant is compared with, could not be measured: "
                               + next((r["skipped"] for r in rows if r["variant"] == BASELINE), "not in the variants"))
        for r in rows:
            r.setdefault("verdict", "skipped")
        return {**head, "chosen": None, "chosen_quality": None,
                "reason": "interrupted before float32 jit (the reference) was measured: nothing chosen or saved"}
    eligible = []
    for r in rows:
        if "skipped" in r:
            r["verdict"] = "skipped"
        elif r is base:
            r["verdict"] = "the baseline"
        elif r["kind"] == report_out.EXTERNAL:
            r["verdict"] = f"external baseline, never chosen ({rate(r) / rate(base):.2f}x {BASELINE})"
        elif r.get("kernels") == "xla":  # a comparison row: what the CPU kernels buy
            twin = next((t for t in rows if t["variant"] == r["same_as"] and "speed" in t), None)
            gain = f" (with them: {rate(twin) / rate(r):.2f}x this speed)" if twin else ""
            r["verdict"] = f"never chosen: {r['same_as']} through XLA's ops instead of the CPU kernels{gain}"
        elif "non_finite" in r["quality"]:  # float16 overflowing: no quality figure means anything
            r["verdict"] = f"rejected: {r['quality']['non_finite']}"
        elif not budget.holds(r["quality"]):
            r["verdict"] = f"outside the quality budget ({budget})"
        elif not rate(r) > rate(base):  # a NaN rate is not faster either
            r["verdict"] = f"not faster than {BASELINE} at batch {batch}"
        else:
            r["verdict"] = "within budget"
            eligible.append(r)
    best = max(eligible, key=rate, default=None)
    if best is None:
        reason = f"no variant is both within the budget ({budget}) and faster than {BASELINE}: keeping {BASELINE}"
        best = base
    else:
        best["verdict"] = "chosen"
        reason = (f"{best['variant']}: the fastest within the budget ({budget}), "
                  f"{rate(best) / rate(base):.2f}x {BASELINE} at batch {batch}")
    if interrupted:
        reason += " (interrupted: chosen among the rows measured before Ctrl-C)"
    return {**head, "chosen": best["variant"], "chosen_quality": best["quality"], "reason": reason}


def default_out(model_arg: str | None, task: str) -> Path:
    """--out when not given: ./accelerated/<the model's name> (a .gguf file's name without it)."""
    from .default_models import GEMMA, MINILM

    name = model_arg or (MINILM if task == "embed" else GEMMA)
    path = Path(name).expanduser()
    return Path("accelerated") / (path.stem if path.suffix.lower() == ".gguf" else path.resolve().name or "model")


def accelerate(model, out: Path, task: str, budget: Budget, batch_sizes=(1,), new_tokens: int = 32,
               time_budget_min: float | None = None, eval_rows: measure.LabelledRows | None = None,
               source: str = "", log: Callable[[str], None] = print, overwrite: bool = False,
               show_progress: bool = False, **plan_kw) -> dict:
    """Measure, choose, then write to `out`: model/ (the chosen variant as a serving folder
    `jaxaccel.load` reads), report.json, report.md and report.png. `out` may be new, empty or an
    earlier accelerate output (replaced atomically once the new one is complete); anything else is
    refused before measuring unless `overwrite`. Interrupted (Ctrl-C), the report of the rows
    measured so far is still written (report["interrupted"]). `show_progress`: a progress bar on
    stderr while measuring."""
    from .checkpoints.folders import atomic_folder
    from .checkpoints.serving import save

    report_out.check_out(out, overwrite)
    time_budget_s = None if time_budget_min is None or math.isinf(time_budget_min) else 60.0 * time_budget_min
    with report_out.progress_bar(show_progress) as progress:
        report = plan(model, task, budget, batch_sizes, new_tokens, time_budget_s=time_budget_s, eval_rows=eval_rows,
                      source=source or None, log=log, progress=progress, **plan_kw)
    measured = [r["memory"]["peak_rss_bytes"] for r in report["rows"] if "memory" in r]
    report.update(model=source, machine=report_out.machine(), pareto=report_out.pareto(report),
                  peak_rss_bytes=max(measured, default=0), saved=None)
    chosen = variant_named(report["chosen"], task, source or None) if report["chosen"] else None
    if chosen is not None:  # a speculative or float32 choice is saved as float32; the report says how to run it
        saved = (build(model, chosen, source=source) if chosen.gguf_as_stored
                 else model.quantize(chosen.quant or QuantConfig(mode="float32")))
        report["saved"] = {"folder": "model", "quant": json.loads(saved.quant.to_json()),
                           "speculative": chosen.speculative, "mesh": chosen.mesh_text}
    with atomic_folder(out, overwrite=True) as tmp:  # check_out refused anything but an earlier output
        if chosen is not None:
            save(saved, tmp / "model")
        text = report_out.write(report, tmp)
    log(text)
    log(report["reason"])
    if chosen is None:
        log(f"interrupted: wrote {out}/report.json, report.md, report.png (no model saved)")
        return report
    run = {"generate": f"jaxaccel generate --model {Path(out) / 'model'} \"...\"" + (
        f" --speculative {chosen.speculative}" if chosen.speculative else "") + (
        f" --mesh {chosen.mesh_text}" if chosen.mesh else ""),
        "embed": f"jaxaccel embed --model {Path(out) / 'model'} ...",
        "classify": f"jaxaccel classify --model {Path(out) / 'model'} ..."}[task]
    log(f"{'interrupted: ' if report['interrupted'] else ''}saved to {out}: model/ ({run}), report.json, "
        "report.md, report.png")
    return report
