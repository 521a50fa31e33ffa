"""`jaxaccel accelerate`: measure a model's acceleration variants on this machine, keep the fastest
one within a quality budget, save it, and report every variant in a table, JSON and a plot.

Variants (those that apply): float32 eager (un-jitted, what a newcomer writes: the baseline),
float32 jit, bfloat16, int8 per channel and per group, int4 per group (two group sizes), w8a8,
and speculative decoding with prompt lookup or an int8 self-draft (greedy: float32's quality by
construction). Speed is measured warm, per batch size asked for: compile time, time to first token, decode tokens/s,
p50 / p90 request latency, params bytes and the process's resident memory. Quality is measured
against float32 on a held-out text shipped with the package (eval_data/heldout.txt, never used
to tune anything): for language models the next-token KL divergence (mean and 99th percentile),
top-1 agreement and perplexity change; for encoders the cosine with float32's embeddings.

The choice is the fastest variant (decode tokens/s at the first batch size) within the budget
that beats float32 jit; variants slower than float32 jit, or outside the budget, are listed
with the reason. When nothing qualifies the report says so and float32 jit is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .quant import QuantConfig

HELDOUT = Path(__file__).with_name("eval_data") / "heldout.txt"
BASELINE = "float32 jit"


@dataclass(frozen=True)
class Variant:
    name: str
    quant: QuantConfig | None = None  # None: the model as loaded (float32)
    speculative: str | None = None
    eager: bool = False  # un-jitted step by step (jax.disable_jit): the newcomer's baseline


@dataclass(frozen=True)
class Budget:
    """The quality a variant must keep: `metric` ("kl": mean next-token KL <= limit, "ppl":
    perplexity increase <= limit percent, "cos": mean cosine >= limit) ."""

    metric: str
    limit: float

    @staticmethod
    def parse(text: str | None, task: str) -> "Budget":
        """"kl:0.02", "ppl:2%" (or "2%"), "cos:0.995" (or a bare number: kl for LMs, cos for
        encoders); None: the default, kl:0.02 / cos:0.995."""
        if task not in ("generate", "embed"):
            raise ValueError(f"--task {task} is not measured yet; use --task generate or --task embed")
        text = text if text is not None else ("cos:0.995" if task == "embed" else "kl:0.02")
        t = text.strip().lower()
        metric, _, value = t.rpartition(":")
        if not metric:
            metric = "ppl" if value.endswith("%") else ("cos" if task == "embed" else "kl")
        try:
            limit = float(value.rstrip("%"))
        except ValueError:
            limit = math.nan
        allowed = ("cos",) if task == "embed" else ("kl", "ppl")
        if metric not in allowed or not math.isfinite(limit) or limit < 0 or (metric == "cos" and limit > 1):
            raise ValueError(f"--quality-budget {text!r}: expected one of {', '.join(m + ':N' for m in allowed)} "
                             "(e.g. kl:0.02, ppl:2%, cos:0.995)")
        return Budget(metric, limit)

    def holds(self, quality: dict) -> bool:
        if self.metric == "kl":
            return quality["kl_mean"] <= self.limit
        if self.metric == "ppl":
            return quality["ppl_delta_pct"] <= self.limit
        return quality["cos_mean"] >= self.limit

    def __str__(self) -> str:
        return {"kl": f"mean KL <= {self.limit:g}", "ppl": f"perplexity +{self.limit:g}% at most",
                "cos": f"mean cosine >= {self.limit:g}"}[self.metric]


def parse_batch_sizes(text: str, task: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers separated by commas, got {text!r}")
    return sizes


def lm_variants() -> list[Variant]:
    return [Variant("float32 eager", eager=True), Variant(BASELINE), Variant("bfloat16", QuantConfig(mode="bfloat16")),
            Variant("int8 per channel", QuantConfig(mode="int8")),
            Variant("int8 g32", QuantConfig(mode="int8", int8_group_size=32)),
            Variant("int4 g32", QuantConfig(mode="int4", group_size=32)),
            Variant("int4 g128", QuantConfig(mode="int4", group_size=128)),
            Variant("w8a8", QuantConfig(mode="w8a8")),
            Variant("prompt lookup", speculative="prompt_lookup"),
            Variant("int8 self-draft", speculative="self:int8")]


def encoder_variants() -> list[Variant]:
    return [Variant(BASELINE), Variant("bfloat16", QuantConfig(mode="bfloat16")),
            Variant("int8 per channel", QuantConfig(mode="int8")), Variant("w8a8", QuantConfig(mode="w8a8"))]


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# -- language models ------------------------------------------------------------------------------

def lm_windows(tokenizer, text: str, window: int, n: int) -> np.ndarray:
    """[<= n, window] token ids: BOS + window - 1 held-out tokens each."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    body = window - 1
    rows = [ids[i * body:(i + 1) * body] for i in range(min(n, len(ids) // body))]
    if not rows:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {window}")
    return np.asarray([[tokenizer.bos_token_id, *r] for r in rows], np.int32)


def lm_quality(ref_logp: list[np.ndarray], model, windows: np.ndarray) -> dict:
    """KL(float32 || variant) of each next-token distribution, top-1 agreement, perplexity change."""
    import jax

    kls, agree, nll, nll_ref, n = [], 0, 0.0, 0.0, 0
    for ref, row in zip(ref_logp, windows):
        logp = np.asarray(jax.nn.log_softmax(model.logits(row[None])[0, :-1].astype("float32"), axis=-1), np.float64)
        kls.append(np.sum(np.exp(ref) * (ref - logp), axis=-1))
        agree += int(np.sum(ref.argmax(-1) == logp.argmax(-1)))
        nxt = row[1:]
        nll -= float(np.sum(logp[np.arange(len(nxt)), nxt]))
        nll_ref -= float(np.sum(ref[np.arange(len(nxt)), nxt]))
        n += len(nxt)
    kl = np.concatenate(kls)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "top1_agreement": agree / n,
            "ppl": math.exp(nll / n), "ppl_delta_pct": 100.0 * (math.exp((nll - nll_ref) / n) - 1.0)}


def lm_speed(model, variant: Variant, prompt: str, batch: int, new_tokens: int, repeats: int) -> dict:
    from .generation import GenerationStats, generate

    if variant.eager:  # no cache, no jit: each token runs the whole sequence op by op
        import jax

        ids = list(model.tokenizer(prompt)["input_ids"])
        t0 = time.perf_counter()
        with jax.disable_jit():
            for i in range(new_tokens):
                ids.append(int(np.argmax(np.asarray(model.logits(np.asarray([ids] * batch)))[0, -1])))
                if i == 0:
                    first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        rate = batch * max(new_tokens - 1, 1) / max(total - first, 1e-9)
        return {"compile_s": 0.0, "ttft_s": first, "decode_tok_s": rate, "latency_p50_s": total, "latency_p90_s": total}
    run = lambda stats: generate(model, [prompt] * batch, max_new_tokens=new_tokens, stats=stats,
                                 speculative=variant.speculative)
    t0 = time.perf_counter()
    run(GenerationStats())
    first_call = time.perf_counter() - t0
    stats = []
    for _ in range(repeats):
        s = GenerationStats()
        run(s)
        stats.append(s)
    totals = [s.total_time for s in stats]
    best = min(stats, key=lambda s: s.total_time)
    return {"compile_s": max(first_call - min(totals), 0.0), "ttft_s": float(np.median([s.time_to_first_token for s in stats])),
            "decode_tok_s": best.decode_tokens_per_s, "latency_p50_s": float(np.percentile(totals, 50)),
            "latency_p90_s": float(np.percentile(totals, 90))}


# -- encoders -------------------------------------------------------------------------------------

def encoder_quality(ref: np.ndarray, model, texts: list[str]) -> dict:
    got = model.embed(texts)
    cos = np.sum(ref * got, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def encoder_speed(model, texts: list[str], batch: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    model.embed(texts, batch_size=batch)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.embed(texts, batch_size=batch)
        times.append(time.perf_counter() - t)
    return {"compile_s": max(first - min(times), 0.0), "sentences_s": len(texts) / min(times),
            "latency_p50_s": float(np.percentile(times, 50)), "latency_p90_s": float(np.percentile(times, 90))}


# -- the plan -------------------------------------------------------------------------------------

def plan(model, task: str, budget: Budget, batch_sizes=(1,), new_tokens: int = 32, windows: int = 4,
         window: int = 128, repeats: int = 2, time_budget_s: float | None = None,
         variants: list[Variant] | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure every variant; -> the report (rows, choice, reason). Nothing is saved here."""
    text = HELDOUT.read_text()
    variants = variants or (lm_variants() if task == "generate" else encoder_variants())
    started = time.perf_counter()
    rows = []
    if task == "generate":
        import jax

        win = lm_windows(model.tokenizer, text, window, windows)
        ref = [np.asarray(jax.nn.log_softmax(model.logits(r[None])[0, :-1].astype("float32"), axis=-1), np.float64)
               for r in win]
        prompt = model.tokenizer.decode(win[0][1:33].tolist())
    else:
        sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 3]
        ref = model.embed(sentences)
    for v in variants:
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            rows.append({"variant": v.name, "skipped": "the time budget ran out"})
            log(f"  {v.name}: skipped (time budget)")
            continue
        row = {"variant": v.name, "quant": None if v.quant is None else json.loads(v.quant.to_json()),
               "speculative": v.speculative}
        try:
            m = model.quantize(v.quant) if v.quant is not None else model
            row["params_bytes"] = m.params_bytes
            if task == "generate":
                row["quality"] = ({"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "ppl_delta_pct": 0.0,
                                   "exact": "greedy decoding equals float32's"}
                                  if v.eager or v.speculative else lm_quality(ref, m, win))
                row["speed"] = {b: lm_speed(m, v, prompt, b, new_tokens if not v.eager else min(new_tokens, 4),
                                            repeats) for b in batch_sizes}
            else:
                row["quality"] = encoder_quality(ref, m, sentences)
                row["speed"] = {b: encoder_speed(m, sentences, b, repeats) for b in batch_sizes}
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:  # a variant this model cannot take
            row["skipped"] = f"{type(e).__name__}: {e}"
        row["rss_bytes"] = _rss_bytes()
        rows.append(row)
        log(f"  {v.name}: " + (row.get("skipped") or _summary(row, task, batch_sizes[0])))
    return choose(rows, task, budget, batch_sizes[0])


def _rate(row: dict, task: str, batch: int) -> float:
    s = row["speed"][batch]
    return s["decode_tok_s"] if task == "generate" else s["sentences_s"]


def _summary(row: dict, task: str, batch: int) -> str:
    q = row["quality"]
    quality = f"KL {q['kl_mean']:.4f}, top-1 {q['top1_agreement']:.1%}" if task == "generate" else f"cos {q['cos_mean']:.5f}"
    unit = "tok/s" if task == "generate" else "sentences/s"
    return f"{_rate(row, task, batch):.1f} {unit}, {quality}"


def choose(rows: list[dict], task: str, budget: Budget, batch: int) -> dict:
    """The fastest row within the budget that beats float32 jit; every other row gets its reason."""
    base = next((r for r in rows if r["variant"] == BASELINE and "skipped" not in r), None)
    if base is None:
        raise RuntimeError("float32 jit, the reference every variant is compared with, could not be measured")
    base_rate = _rate(base, task, batch)
    eligible = []
    for r in rows:
        if "skipped" in r or r is base:
            r.setdefault("verdict", "skipped" if "skipped" in r else "the baseline")
            continue
        if not budget.holds(r["quality"]):
            r["verdict"] = f"outside the quality budget ({budget})"
        elif _rate(r, task, batch) <= base_rate:
            r["verdict"] = f"not faster than {BASELINE} at batch {batch}"
        else:
            r["verdict"] = "within budget"
            eligible.append(r)
    best = max(eligible, key=lambda r: _rate(r, task, batch), default=None)
    if best is None:
        reason = f"no variant is both within the budget ({budget}) and faster than {BASELINE}: keeping {BASELINE}"
        best = base
    else:
        best["verdict"] = "chosen"
        reason = (f"{best['variant']}: the fastest within the budget ({budget}), "
                  f"{_rate(best, task, batch) / base_rate:.2f}x {BASELINE} at batch {batch}")
    return {"task": task, "budget": dataclasses.asdict(budget), "batch": batch, "rows": rows,
            "chosen": best["variant"], "reason": reason}


def variant_named(name: str, task: str) -> Variant:
    return next(v for v in (lm_variants() if task == "generate" else encoder_variants()) if v.name == name)


def plot(report: dict, path: Path) -> Path:
    """Speed against quality loss for every measured variant, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, batch = report["task"], report["batch"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        if "skipped" in r:
            continue
        q = r["quality"]
        loss = q["kl_mean"] if task == "generate" else 1.0 - q["cos_mean"]
        chosen = r["variant"] == report["chosen"]
        ax.scatter(_rate(r, task, batch), max(loss, 1e-6), s=80 if chosen else 30, c="tab:red" if chosen else "tab:blue")
        ax.annotate(r["variant"], (_rate(r, task, batch), max(loss, 1e-6)), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    b = report["budget"]
    if b["metric"] in ("kl", "cos"):  # the budget's line (perplexity budgets have no axis here)
        ax.axhline(b["limit"] if b["metric"] == "kl" else 1.0 - b["limit"], color="tab:gray", linestyle="--",
                   linewidth=1, label="quality budget")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(("decode tokens/s" if task == "generate" else "sentences/s") + f" (batch {batch})")
    ax.set_ylabel(("mean KL vs float32" if task == "generate" else "1 - mean cosine vs float32") + " (1e-6: exact)")
    ax.set_title(f"jaxaccel accelerate: chosen {report['chosen']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(report: dict) -> str:
    """The report as a rich table (text)."""
    from rich.console import Console
    from rich.table import Table

    task, batch = report["task"], report["batch"]
    gen = task == "generate"
    t = Table(title=f"jaxaccel accelerate ({task}); chosen: {report['chosen']}")
    for col in ["variant", "tok/s" if gen else "sent/s", "TTFT ms" if gen else "p50 ms", "compile s", "params MiB",
                "KL mean" if gen else "cos mean", "KL p99" if gen else "cos min", "top-1" if gen else "", "ppl Δ%" if gen
                else "", "verdict"]:
        if col:
            t.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
    for r in report["rows"]:
        if "skipped" in r:
            t.add_row(r["variant"], *[""] * (7 if gen else 5), r["skipped"])
            continue
        s, q = r["speed"][batch], r["quality"]
        cells = [f"{_rate(r, task, batch):.1f}", f"{1e3 * (s['ttft_s'] if gen else s['latency_p50_s']):.0f}",
                 f"{s['compile_s']:.1f}", f"{r['params_bytes'] / 2**20:.0f}"]
        cells += ([f"{q['kl_mean']:.4f}", f"{q['kl_p99']:.4f}", f"{q['top1_agreement']:.1%}", f"{q['ppl_delta_pct']:+.2f}"]
                  if gen else [f"{q['cos_mean']:.5f}", f"{q['cos_min']:.5f}"])
        t.add_row(r["variant"], *cells, r["verdict"])
    console = Console(width=160, record=True)
    with console.capture() as cap:
        console.print(t)
    return cap.get()


def accelerate(model, out: Path, task: str, budget: Budget, batch_sizes=(1,), new_tokens: int = 32,
               time_budget_min: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure, choose, then write to `out` (a new or empty folder): model/ (the chosen variant as
    a serving folder `jaxaccel.load` reads), report.json, report.txt and speed_quality.png."""
    from .checkpoints.folders import atomic_folder
    from .checkpoints.serving import save

    time_budget_s = None if time_budget_min is None else 60.0 * time_budget_min
    report = plan(model, task, budget, batch_sizes, new_tokens, time_budget_s=time_budget_s, log=log)
    chosen = variant_named(report["chosen"], task)
    # a speculative or float choice is saved as float32; the report says how to run it
    saved = model.quantize(chosen.quant or QuantConfig(mode="float32"))
    report["saved"] = {"folder": "model", "quant": json.loads(saved.quant.to_json()), "speculative": chosen.speculative}
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with atomic_folder(out, overwrite=True) as tmp:  # the caller refused a non-empty `out` before the work
        save(saved, tmp / "model")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        text = table(report)
        (tmp / "report.txt").write_text(text + "\n" + report["reason"] + "\n")
        plot(report, tmp / "speed_quality.png")
    log(text)
    log(report["reason"])
    run = f"jaxaccel generate --model {Path(out) / 'model'} \"...\"" + (
        f" --speculative {chosen.speculative}" if chosen.speculative else "")
    log(f"saved to {out}: model/ ({run}), report.json, report.txt, speed_quality.png")
    return report
