"""llama.cpp as the peer in our benchmark: the same language model, the same CPU, the same run.

    python -m bench.llama_cpp                              # bf16, int8 and int4, ours and llama.cpp
    python -m bench.llama_cpp --precisions int4 --skip-ours

Opt-in (not part of ``make test``), and long: the first run downloads llama.cpp's source (the
``llama-cpp-python`` sdist on PyPI vendors it) and builds ``llama-bench`` and ``llama-quantize``
(Release, CPU backend, ``GGML_NATIVE``) under bench/.cache/llama.cpp, converts the language model
of the bench's random full-size Mipha-3B (``bench.chat_latency.build_checkpoint``) to a BF16 GGUF
and quantizes it to Q8_0 and Q4_K_M; all of that is cached (see ``llama_cpp_build`` and
``llama_cpp_models``). Every run then measures, per precision:

- ours: ``bench.chat_latency``'s worker for one first turn with the photo (its naive and engine
  modes both read the whole prompt, so two samples), each precision in a fresh process. Prompt
  tok/s = prompt positions / (time to first token − vision time); decode tok/s after the first
  token of each 32-token reply. Medians.
- llama.cpp: ``llama-bench -t THREADS -r REPS -o json``, once for the prompt (as many positions as
  ours reads: ``-p N -n 0``) and once for 32-token decodes after a prompt of that length and from
  an empty context (``-p 0 -n 32 -d N,0``); the table uses the first, which is what our reply does.
  Medians of its samples.

bf16 (PyTorch) runs against BF16, int8 (``--load-8bit``, on llama.cpp as ``auto`` picks on a CPU)
against Q8_0 and int4 (``--load-4bit``) against Q4_K_M; ``int8-torch`` and ``int4-torch`` are the
PyTorch runtime's packed kernels (``--runtime torch``), the alternative we measured against. Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.chat_latency import CHECKPOINT, RESULTS, build_checkpoint, machine
from bench.llama_cpp_build import BenchError, LlamaCpp, ensure_llama_cpp, existing_llama_cpp
from bench.llama_cpp_models import gguf_models
from bench.memory import read_bandwidth

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
PROMPT_POSITIONS = 771
"""Positions of the bench's first turn (729 for the photo, 42 of text) when this was written; used
for llama.cpp only with --skip-ours, otherwise ours says how many it read."""
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    ours: str
    """The ``bench.chat_latency`` configuration."""
    gguf: str
    """The llama.cpp file type it is compared with."""


PRECISIONS = {
    "bf16": Precision(ours="bf16", gguf="BF16"),
    "int8": Precision(ours="llama-int8", gguf="Q8_0"),
    "int4": Precision(ours="llama-int4", gguf="Q4_K_M"),
    "int8-torch": Precision(ours="8bit", gguf="Q8_0"),
    "int4-torch": Precision(ours="4bit", gguf="Q4_K_M"),
}


def run_ours(precision: Precision, *, checkpoint: Path, turns: int, reply_tokens: int) -> dict:
    """``bench.chat_latency``'s worker in a fresh process, plus the medians the table needs."""
    command = [sys.executable, "-m", "bench.chat_latency", "--worker", precision.ours, "--checkpoint", str(checkpoint),
               "--turns", str(turns), "--reply-tokens", str(reply_tokens)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)  # its log goes to ours
    if result.returncode != 0:
        raise BenchError(f"our engine failed in {precision.ours} (exit code {result.returncode}); its log is above")
    raw = json.loads(result.stdout.strip().splitlines()[-1])
    # the question sent at once; "typed" counts from Send, after reading while the question was typed
    first_turns = [turns[0] for mode, turns in raw["turns"].items() if mode != "typed"]
    replies = [turn for turn in first_turns if turn["decode_tokens_per_second"]]  # after the prompt, as llama-bench -d
    typed = raw["turns"].get("typed")
    return {
        "prompt_positions": first_turns[0]["prompt_tokens"],
        "prompt_tokens_per_second": statistics.median(  # positions read: Mipha's system sentence is kept read
            (turn["prompt_tokens"] - turn["reused_tokens"]) / (turn["first_token_seconds"] - turn["vision_seconds"])
            for turn in first_turns),
        "vision_seconds": statistics.median(turn["vision_seconds"] for turn in first_turns),
        "first_token_seconds": statistics.median(turn["first_token_seconds"] for turn in first_turns),
        "typed_first_token_seconds": typed[0]["first_token_seconds"] if typed else None,
        "decode_tokens_per_second": statistics.median(turn["decode_tokens_per_second"] for turn in replies),
        "chat_latency": raw,
    }


def run_llama_bench(llama: LlamaCpp, model: Path, *, prompt_tokens: int, reply_tokens: int, threads: int,
                    repetitions: int) -> dict:
    """Prompt speed at ``prompt_tokens`` positions; decode speed after such a prompt and from empty."""
    common = ["-m", str(model), "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    prompt = _llama_bench(llama, [*common, "-p", str(prompt_tokens), "-n", "0", "-fa", "auto,off"])
    decode = _llama_bench(llama, [*common, "-p", "0", "-n", str(reply_tokens), "-d", f"{prompt_tokens},0",
                                  "-fa", "auto,off"])

    def median(tests: list[dict], *, depth: int | None = None, flash_attention: str = "auto") -> float:
        chosen = [test for test in tests if (depth is None or test["n_depth"] == depth)
                  and _flash_attention(test) == flash_attention]
        return statistics.median(chosen[0]["samples_ts"])

    return {
        "prompt_tokens_per_second": median(prompt),
        "decode_tokens_per_second": median(decode, depth=prompt_tokens),
        "decode_tokens_per_second_from_empty": median(decode, depth=0),
        "prompt_tokens_per_second_flash_attention_off": median(prompt, flash_attention="off"),
        "decode_tokens_per_second_flash_attention_off": median(decode, depth=prompt_tokens, flash_attention="off"),
        "llama_bench": prompt + decode,
    }


def _flash_attention(test: dict) -> str:
    """llama-bench's JSON gives flash attention as -1/0/1 (or a boolean in older versions, a name in newer ones)."""
    value = test.get("flash_attn", test.get("flash_attn_type"))
    names = {"-1": "auto", "1": "on", "0": "off", "True": "on", "False": "off", "enabled": "on", "disabled": "off"}
    return names.get(str(value), str(value))


def _llama_bench(llama: LlamaCpp, arguments: list[str]) -> list[dict]:
    command = [str(llama.tool("llama-bench")), *arguments]
    logger.info("%s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        logger.error("llama-bench said:\n%s", "\n".join(result.stderr.strip().splitlines()[-20:]))
        raise BenchError(f"llama-bench failed (exit code {result.returncode}); its output is logged above")
    return json.loads(result.stdout)


def cpu_flags() -> list[str]:
    """The CPU features that decide these kernels' speed, as /proc/cpuinfo names them."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])) if cpuinfo.is_file() else set()
    return [flag for flag in CPU_FLAGS if flag in flags]


def table(rows: dict[str, dict]) -> str:
    """Ours beside llama-bench's default (flash attention "auto") and with it off (ours runs without it)."""
    columns = [("ours prompt", 11), ("llama.cpp prompt", 16), ("(fa off)", 8), ("ratio", 5),
               ("ours decode", 11), ("llama.cpp decode", 16), ("(fa off)", 8), ("ratio", 5), ("(llama.cpp from empty)", 22)]
    header = f"{'precision':9} {'GGUF':7} " + " ".join(f"{name:>{width}}" for name, width in columns)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        ours, peer = row.get("ours") or {}, row.get("llama_cpp") or {}
        values = [ours.get("prompt_tokens_per_second"), peer.get("prompt_tokens_per_second"),
                  peer.get("prompt_tokens_per_second_flash_attention_off"),
                  _ratio(ours.get("prompt_tokens_per_second"), peer.get("prompt_tokens_per_second")),
                  ours.get("decode_tokens_per_second"), peer.get("decode_tokens_per_second"),
                  peer.get("decode_tokens_per_second_flash_attention_off"),
                  _ratio(ours.get("decode_tokens_per_second"), peer.get("decode_tokens_per_second")),
                  peer.get("decode_tokens_per_second_from_empty")]
        cells = [_cell(value, width) for value, (_, width) in zip(values, columns, strict=True)]
        lines.append(f"{name:9} {PRECISIONS[name].gguf:7} " + " ".join(cells))
    return "\n".join(lines)


def first_turn_table(rows: dict[str, dict]) -> str:
    """The first turn in seconds: ours (sent at once; typed, from Send) against llama.cpp reading the
    same positions at llama-bench's default speed, plus our photo encoding."""
    header = f"{'precision':9} {'ours at once':>12} {'ours typed':>10} {'llama.cpp + vision':>18}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        ours, peer = row.get("ours") or {}, row.get("llama_cpp") or {}
        rate = peer.get("prompt_tokens_per_second")
        peer_seconds = (ours["prompt_positions"] / rate + ours["vision_seconds"]) if rate and ours else None
        cells = [_cell(ours.get("first_token_seconds"), 12), _cell(ours.get("typed_first_token_seconds"), 10),
                 _cell(peer_seconds, 18)]
        lines.append(f"{name:9} " + " ".join(cells))
    return "\n".join(lines)


def _ratio(ours: float | None, peer: float | None) -> float | None:
    return ours / peer if ours and peer else None


def _cell(value: float | None, width: int) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["bf16", "int8", "int4"])
    parser.add_argument("--skip-ours", action="store_true", help="measure llama.cpp only")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="measure ours only (no build either)")
    parser.add_argument("--skip-build", action="store_true", help="use the cached llama.cpp build; fail if there is none")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (ours: torch's default)")
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench -r")
    parser.add_argument("--turns", type=int, default=1, help="turns per conversation for ours (1: only the first turn)")
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, help="llama.cpp's prompt length (default: what ours read)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    try:
        report = run(args)
    except BenchError as error:
        sys.exit(f"error: {error}")
    report["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"llama_cpp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(summary(report))
    print(f"written to {path} ({report['seconds'] / 60:.0f} min in all)")


def run(args: argparse.Namespace) -> dict:
    checkpoint = build_checkpoint(args.checkpoint)
    models, llama = {}, None
    if not args.skip_llama_cpp:
        llama = existing_llama_cpp() if args.skip_build else ensure_llama_cpp()
        models = gguf_models(llama, checkpoint, types=[PRECISIONS[name].gguf for name in args.precisions])
    bandwidth = read_bandwidth()
    logger.info("memory read bandwidth: %.1f GB/s", bandwidth / 1e9)
    rows: dict[str, dict] = {name: {} for name in args.precisions}
    for name in [] if args.skip_ours else args.precisions:
        logger.info("ours: %s", name)
        rows[name]["load_average_before_ours"] = os.getloadavg()  # others' work on the CPU skews both sides
        rows[name]["ours"] = run_ours(PRECISIONS[name], checkpoint=checkpoint, turns=args.turns,
                                      reply_tokens=args.reply_tokens)
    measured = [row["ours"]["prompt_positions"] for row in rows.values() if "ours" in row]
    prompt_tokens = args.prompt_tokens or (measured[0] if measured else PROMPT_POSITIONS)
    for name in args.precisions if llama else []:
        logger.info("llama.cpp: %s", PRECISIONS[name].gguf)
        rows[name]["load_average_before_llama_cpp"] = os.getloadavg()
        rows[name]["llama_cpp"] = run_llama_bench(llama, models[PRECISIONS[name].gguf], prompt_tokens=prompt_tokens,
                                                  reply_tokens=args.reply_tokens, threads=args.threads,
                                                  repetitions=args.repetitions)
    return {"machine": {**machine(), "cpu_flags": cpu_flags(), "load_average": os.getloadavg()},
            "bandwidth_bytes_per_second": bandwidth, "llama_cpp_python_version": llama and llama.version,
            "prompt_tokens": prompt_tokens, "reply_tokens": args.reply_tokens, "threads": args.threads,
            "repetitions": args.repetitions, "turns": args.turns, "results": rows}


def summary(report: dict) -> str:
    info = report["machine"]
    return "\n".join([
        f"{info['cpu']}, {info['cores']} cores; flags: {' '.join(info['cpu_flags']) or 'none of note'}; "
        f"memory read bandwidth {report['bandwidth_bytes_per_second'] / 1e9:.1f} GB/s",
        f"llama.cpp from llama-cpp-python {report['llama_cpp_python_version']}, {report['threads']} threads, "
        f"{report['repetitions']} repetitions; ours: torch {info['torch']}, {info['torch_threads']} threads",
        f"prompt: {report['prompt_tokens']} positions (the photo's 729 and the question), tok/s; decode: "
        f"{report['reply_tokens']}-token replies after that prompt, tok/s; ratio = ours / llama.cpp's default",
        table(report["results"]),
        "first turn, seconds to the first token: ours with the question sent at once, and typed (from Send, "
        "the photo dropped first); llama.cpp reading as many positions at its prompt speed, plus our vision",
        first_turn_table(report["results"]),
    ])


if __name__ == "__main__":
    main()
