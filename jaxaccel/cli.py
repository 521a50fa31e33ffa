"""`jaxaccel generate | serve | accelerate | embed | fill-mask | classify | finetune | quantize | convert | info | bench`:
the top of the import graph. Flags map straight onto API arguments; jax and the model code are
imported only once a command runs, so `--help` and bad flags answer at once."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from .command_flags import add_accelerate_arguments, add_serve_arguments
from .finetune_flags import add_finetune_arguments

GEMMA, MINILM = "gemma3-270m", "minilm"  # default_models' names (not imported here: it would load jax)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args, default=GEMMA, fast_tokenizer=False):
    from .default_models import resolve
    from .model import load

    path = resolve(args.model or default, _err)
    t = time.perf_counter()
    m = load(path, dtype=args.dtype, fast_tokenizer=fast_tokenizer, mesh=getattr(args, "mesh", None))
    kind = m.quant.mode if m.quant is not None else m.dtype
    _err(f"loaded {m.config.family} ({m.config.num_params / 1e6:.0f}M params, {kind}, "
         f"{m.params_bytes / 2**20:.0f} MiB) from {path} in {time.perf_counter() - t:.1f}s")
    return m


def cmd_generate(args) -> int:
    from .generation import GenerationStats, generate, prepare

    m = _load(args, fast_tokenizer=True)  # generate needs only encode/decode: skip AutoTokenizer's slow load
    stats = GenerationStats()
    write = lambda i, text: (sys.stdout.write(text), sys.stdout.flush())
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    # Trace now and compile in a thread while generate() parses the tokenizer (lazily loaded),
    # for the bucket the prompt most likely needs (<= 1 token per 3 UTF-8 bytes, plus BOS); a
    # wrong guess only costs a second compile when generate() asks for the real bucket.
    guess = min(len(args.prompt.encode()) // 3 + 2, m.config.max_position_embeddings - args.max_new_tokens)
    if guess >= 1 and args.speculative is None:  # else generate() says what is too long
        prepare(m, 1, guess, args.max_new_tokens, **sampling)
    started = time.time()
    generate(m, [args.prompt], max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop or None,
             stream=write, stats=stats, speculative=_draft_arg(args.speculative), **sampling)
    sys.stdout.write("\n")
    import psutil

    since_launch = started + stats.time_to_first_token - psutil.Process().create_time()
    _err(f"first token {since_launch:.2f}s after launch ({stats.time_to_first_token:.2f}s after generate() was "
         f"called) | prefill {stats.prefill_tokens_per_s:.1f} tok/s ({stats.prompt_tokens} tokens) | "
         f"decode {stats.decode_tokens_per_s:.1f} tok/s ({stats.generated_tokens} tokens)")
    if stats.speculative is not None:
        s = stats.speculative
        _err(f"speculative ({args.speculative}): {s.accepted} of {s.drafted} drafted tokens accepted "
             f"({s.acceptance_rate:.0%}), {s.tokens_per_call:.2f} tokens per forward call over {s.calls} calls")
    return 0


def _draft_arg(spec: str | None):
    """--speculative draft:PATH -> the draft Model (loaded here, at the top of the imports)."""
    if spec is None or not spec.startswith("draft:"):
        return spec
    from .model import load

    return load(spec[len("draft:"):], fast_tokenizer=True)


def cmd_convert(args) -> int:
    from .checkpoints.folders import check_target

    check_target(args.out, args.overwrite)  # before the model is loaded
    m = _load(args)
    out = m.save_hf(args.out, overwrite=args.overwrite)
    _err(f"wrote {out} ({m.params_bytes / 2**20:.0f} MiB of params)")
    return 0


def cmd_serve(args) -> int:
    from .default_models import resolve
    from .openai_api import find_chat_template
    from .server import Server, serve

    lm = _load(args, fast_tokenizer=True)
    encoder = None
    if args.embed_model != "none":
        try:
            encoder = _load(argparse.Namespace(model=args.embed_model, dtype="float32"), default=MINILM)
        except RuntimeError as e:  # the embedded encoder's package is not installed: serve without it
            if args.embed_model is not None:
                raise
            _err(f"no /v1/embeddings: {e}")
    name = lambda arg, default: default if arg in (None, default) else Path(arg).name
    server = Server(lm, name(args.model, GEMMA), encoder, name(args.embed_model, MINILM), slots=args.max_batch,
                    context=args.context, max_queue=args.max_queue,
                    api_key=args.api_key or os.environ.get("JAXACCEL_API_KEY") or None,
                    chat_template=find_chat_template(resolve(args.model or GEMMA, _err), args.chat_template),
                    timeout=args.timeout, speculative=args.speculative)
    serve(server, args.host, args.port, _err)
    return 0


def cmd_accelerate(args) -> int:
    from .accelerate import Budget, accelerate, check_arguments, default_out, parse_batch_sizes
    from .accelerate_report import check_out

    budget, sizes = Budget.parse(args.quality_budget, args.task), parse_batch_sizes(args.batch_sizes, args.task)
    if not args.time_budget > 0:  # nan fails this too
        raise ValueError(f"--time-budget {args.time_budget:g}: expected minutes > 0 (inf: measure every variant)")
    eval_rows = check_arguments(args.task, args.model, args.eval)
    out = check_out(args.out or default_out(args.model, args.task), args.overwrite)  # before any work
    default = MINILM if args.task == "embed" else GEMMA
    m = _load(args, default=default)
    _err(f"measuring into {out} (time budget {args.time_budget:g} min; Ctrl-C stops and keeps the rows measured)")
    try:
        report = accelerate(m, out, args.task, budget, sizes, args.new_tokens, args.time_budget, eval_rows=eval_rows,
                            source=args.model or default, log=_err, overwrite=args.overwrite,
                            show_progress=sys.stderr.isatty())  # a bar only where someone watches it
    except KeyboardInterrupt:  # during float32's reference outputs (later, plan keeps the rows measured)
        _err(f"interrupted before any variant was measured: nothing written to {out}")
        return 130
    if report["saved"] is not None and args.task == "generate":
        _sample(out / "model", report["saved"]["speculative"])
    return 130 if report["interrupted"] else 0  # 130: the shell's code for a Ctrl-C'd command


def _sample(folder: Path, speculative: str | None, prompt: str = "The best thing about a quiet morning is") -> None:
    """A short greedy continuation from the saved folder: it loads and generates as saved."""
    from .generation import generate
    from .model import load

    text = generate(load(folder, fast_tokenizer=True), [prompt], max_new_tokens=24, speculative=speculative)[0]
    _err(f"sample from {folder}: {prompt}{text}")


def cmd_info(args) -> int:
    m = _load(args)
    for k, v in vars(m.config).items():
        print(f"{k:26s} {v}")
    print(f"{'params':26s} {m.num_params:,} ({m.params_bytes / 2**20:.1f} MiB)")
    return 0


# --- encoders: texts in (arguments or --input FILE), JSONL out ------------------------------
def read_texts(args) -> tuple[list, object]:
    """Texts from the arguments or --input (one per line, or JSONL of strings / {"text": ...} /
    {"text": ..., "text_pair": ...}, the last read as a (text, text_pair) pair); returns (texts,
    where) with where(i) naming the source line of text i."""
    import json
    from pathlib import Path

    if args.input and args.texts:
        raise ValueError("give texts as arguments or with --input FILE, not both")
    if not args.input:
        if not args.texts:
            raise ValueError("no input texts: pass them as arguments or with --input FILE")
        return list(args.texts), (lambda i: f"argument {i + 1}")
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    if not lines:
        raise ValueError(f"input file {path} is empty: no texts to read")
    jsonl = args.format == "jsonl" or (args.format == "auto" and path.suffix in (".jsonl", ".ndjson"))
    texts = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {n} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON: {e}") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                pair = obj.get("text_pair")
                if pair is not None and not isinstance(pair, str):
                    raise ValueError(f"{path} line {n}: \"text_pair\" must be a string")
                obj = obj["text"] if pair is None else (obj["text"], pair)
            if not isinstance(obj, (str, tuple)):
                raise ValueError(f"{path} line {n}: a JSONL line must be a string or an object with a \"text\" string")
            line = obj
        texts.append(line)
    return texts, (lambda i: f"{path} line {i + 1}")


def _encoder_task(args, task: str) -> int:
    import json

    from . import encoder_tasks as encoder

    texts, where = read_texts(args)  # all input errors come before loading the model
    if task != "classify":
        for i, t in enumerate(texts):
            if isinstance(t, tuple):
                raise ValueError(f"{where(i)} has a \"text_pair\"; only classify takes sentence pairs")
    m = _load(args, MINILM if task == "embed" else None)
    stats = encoder.EncodeStats()
    kw = dict(truncate=args.truncate, batch_size=args.batch_size, progress=True, stats=stats, where=where)
    t = time.perf_counter()
    if task == "embed":
        results = [{"embedding": [round(float(x), 7) for x in row]} for row in encoder.embed(m, texts, **kw)]
    elif task == "fill-mask":
        results = [{"predictions": [[{"token": tok, "prob": p} for tok, p in mask] for mask in per_text]}
                   for per_text in encoder.fill_mask(m, texts, top_k=args.top_k, **kw)]
    else:
        key = "score" if encoder.score_function(m.config) == "none" else "prob"  # regression: the raw value
        got = encoder.classify(m, texts, all_scores=args.all_scores, **kw)
        results = ([{"labels": [{"label": label, key: p} for label, p in ranked]} for ranked in got] if args.all_scores
                   else [{"label": label, key: p} for label, p in got])
    dt = time.perf_counter() - t
    truncated = set(stats.truncated_rows)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, (text, rec) in enumerate(zip(texts, results)):
            pair = {"text": text[0], "text_pair": text[1]} if isinstance(text, tuple) else {"text": text}
            rec = {"index": i, **pair, **rec, **({"truncated": True} if i in truncated else {})}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    _err(f"{task}: {stats.texts} texts ({stats.truncated} truncated) in {dt:.2f}s, {stats.texts / dt:.1f} texts/s; "
         f"{stats.batches} batches, {stats.tokens / max(stats.padded_tokens, 1):.0%} of padded tokens real")
    return 0


def cmd_finetune(args) -> int:
    from . import distributed
    from .finetuning import finetune, summary
    from .model import load

    model = load(args.model, dtype=args.dtype, fast_tokenizer=args.task == "sft", mesh=args.mesh)
    keys = ("eval_data", "optimizer", "lr", "schedule", "warmup", "weight_decay", "batch_size", "accum",
            "max_length", "pack", "truncate", "save_every", "keep", "lora_rank", "lora_alpha", "lora_dropout",
            "compute_dtype", "quant", "seed", "tensorboard")
    opts = {k: getattr(args, k) for k in keys}
    opts.update(clip=args.clip or None, lora_targets=tuple(args.lora_targets.split(",")))
    out = Path(args.out)
    finetune(model, args.data, task=args.task, steps=args.steps, out=out, **opts)
    if distributed.is_main():
        print(summary(model, out))
    return 0


def _print_table(header: list, rows: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*header)
    for row in rows:
        table.add_row(*map(str, row))
    Console().print(table)


def cmd_quantize(args) -> int:
    from . import quant
    from .checkpoints.serving import save

    if not (args.out or args.report):
        raise ValueError("nothing to do: pass --out DIR (write a quantized checkpoint) and/or --report")
    cfg = quant.QuantConfig(mode=args.mode, group_size=args.group_size, kv_cache_int8=args.kv_cache_int8,
                            quantize_embedding=not args.float_embedding,
                            **({"int4_keeps_int8": ()} if args.all_int4 else {}))  # bad flags fail before loading
    calibration = False if args.no_calibration else None
    if args.calibration:
        calibration = Path(args.calibration).read_text(encoding="utf-8")  # a missing file fails before loading
        if not calibration.strip():
            raise ValueError(f"--calibration {args.calibration} is empty: pass a text file (or --no-calibration)")
    if args.out:
        from .checkpoints.folders import check_target

        check_target(args.out, args.overwrite)
    m = _load(args)
    if args.report:
        _print_table(*quant.memory_report(m, args.group_size))
    if args.out:
        t = time.perf_counter()
        q = m.quantize(cfg, calibration=calibration)
        out = save(q, args.out, overwrite=args.overwrite)
        _err(f"wrote {out}: {cfg.mode} params {q.params_bytes / 2**20:.1f} MiB (float32 {m.params_bytes / 2**20:.1f} MiB) "
             f"in {time.perf_counter() - t:.1f}s; `jaxaccel.load('{out}')` serves it")
    return 0


def cmd_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.which}.py"
    if not script.is_file():
        _err(f"benchmark script {script} not found: benchmarks run from a source checkout of jaxaccel")
        return 2
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except ModuleNotFoundError as e:
        _err(f"error: `jaxaccel bench {args.which}` needs the package {e.name!r}: its baselines run transformers on "
             "PyTorch (pip install -e '.[test]') and ONNX Runtime (pip install -e '.[bench]')"
             + ("; `jaxaccel bench startup --no-transformers` times jaxaccel alone" if args.which == "startup" else ""))
        return 2
    return 0


def _mesh(text):
    """--mesh's type: parsed by sharding (imported only when the flag is given)."""
    from .sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """`--mesh data=2,fsdp=2,tensor=2` for any subcommand (generate, finetune, ...)."""
    parser.add_argument("--mesh", type=_mesh, default=None, metavar="data=D,fsdp=F,tensor=T",
                        help="shard over a device mesh (one axis may be -1 = the rest); default: one device")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxaccel", description="JAX-native language models")
    sub = p.add_subparsers(dest="command", required=True)

    def with_model(sp, default=f"the embedded {GEMMA}", required=False):
        sp.add_argument("--model", required=required,
                        help="HF folder, .gguf file, serving folder or embedded model name "
                             f"({GEMMA}, {MINILM})" + ("" if required else f"; default: {default}"))
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        return sp

    g = with_model(sub.add_parser("generate", help="stream a continuation of a prompt"))
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--speculative", metavar="prompt_lookup|self:int8|self:int4|draft:PATH",
                   help="speculative decoding (greedy: the same text; sampling: the same distribution)")
    add_mesh_argument(g)
    g.set_defaults(fn=cmd_generate)

    v = with_model(sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching, streaming)"))
    add_serve_arguments(v)
    v.set_defaults(fn=cmd_serve)

    a = with_model(sub.add_parser("accelerate", help="measure speed / quality variants here, save the fastest "
                                  "within a quality budget, report them"))
    add_accelerate_arguments(a)
    a.set_defaults(fn=cmd_accelerate)

    c = with_model(sub.add_parser("convert", help="load any supported checkpoint and write an HF folder"))
    c.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    c.set_defaults(fn=cmd_convert)

    i = with_model(sub.add_parser("info", help="print a model's config and size"))
    i.set_defaults(fn=cmd_info)

    for name, help_ in (("embed", "sentence embeddings (default model: all-MiniLM-L6-v2)"),
                        ("fill-mask", "top-k tokens for each [MASK] (BertForMaskedLM folder)"),
                        ("classify", "top label per text (BertForSequenceClassification folder)")):
        e = with_model(sub.add_parser(name, help=help_ + "; writes JSONL"), default=f"the embedded {MINILM}",
                       required=name != "embed")
        e.add_argument("texts", nargs="*", help="texts (or use --input)")
        e.add_argument("--input", help="file with one text per line, or JSONL (strings or {\"text\": ...}; "
                       "classify also takes sentence pairs {\"text\": ..., \"text_pair\": ...})")
        e.add_argument("--format", default="auto", choices=["auto", "lines", "jsonl"],
                       help="--input format (auto: jsonl for .jsonl/.ndjson files)")
        e.add_argument("--output", help="write JSONL here instead of stdout")
        e.add_argument("--truncate", action="store_true", help="cut texts longer than the model's max length "
                       "(counted in the output) instead of failing")
        e.add_argument("--batch-size", type=int, default=32)
        if name == "fill-mask":
            e.add_argument("--top-k", type=int, default=5)
        if name == "classify":
            e.add_argument("--all-scores", action="store_true",
                           help="every label's score, best first (multi-label checkpoints), not only the top label")
        e.set_defaults(fn=lambda a, task=name: _encoder_task(a, task))

    f = add_finetune_arguments(sub.add_parser("finetune", help="fine-tune with optax; rerun on the same --out to resume"))
    add_mesh_argument(f)
    f.set_defaults(fn=cmd_finetune)

    q = with_model(sub.add_parser("quantize", help="write a quantized checkpoint that jaxaccel.load serves; "
                                  "--report prints measured params bytes per mode"))
    q.add_argument("--mode", default="int8", help="float32 | bfloat16 | float16 | int8 | int4 | w8a8 | qat")
    q.add_argument("--out", help="output folder (refused if it exists and is not empty)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    q.add_argument("--group-size", type=int, default=32, help="int4 inputs per scale (must divide the input dims)")
    q.add_argument("--all-int4", action="store_true", help="int4: quantize v_proj and down_proj to int4 too "
                   "(by default they stay int8, which keeps greedy text far closer to float32)")
    q.add_argument("--float-embedding", action="store_true", help="keep the token embedding / lm_head in float")
    cal = q.add_mutually_exclusive_group()
    cal.add_argument("--calibration", metavar="TEXT_FILE", help="int4: weigh each scale search by the activations "
                     "on this text (default: the text shipped for it, jaxaccel/eval_data/calibration.txt)")
    cal.add_argument("--no-calibration", action="store_true", help="int4: unweighted scale search")
    q.add_argument("--kv-cache-int8", action="store_true", help="serve with an int8 KV cache")
    q.add_argument("--report", action="store_true", help="print a table of measured params bytes per mode")
    q.set_defaults(fn=cmd_quantize)

    b = sub.add_parser("bench", help="run a benchmark script from bench/ (e.g. jaxaccel bench decode --quick)")
    b.add_argument("which", choices=["decode", "encoder", "quant_quality", "quant_speed", "startup", "train"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # a command's notices are one line each, and transformers' advice that PyTorch is missing
    # (only tokenizers are used from it) is noise here
    warnings.formatwarning = _one_line_warning
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from . import program_cache

    program_cache.enable()
    try:
        if getattr(args, "mesh", None) is not None or os.environ.get("JAXACCEL_COORDINATOR"):
            # Multi-host: every host runs the same command. Joins the cluster jax finds (TPU VM
            # slices, SLURM, Open MPI) or the one JAXACCEL_COORDINATOR / _NUM_PROCESSES /
            # _PROCESS_ID name; a lone process stays one.
            from .distributed import initialize

            initialize()
        return args.fn(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:  # bad input, a missing / unwritable file
        _err(f"error: {e}")
        return 2
    finally:
        program_cache.set_folder(None)  # saved traces are the command's; a caller's process keeps its own setting


if __name__ == "__main__":
    sys.exit(main())
