"""Chat latency on a full-size random Mipha-3B: naive re-reading versus the engine's caches.

    python -m bench.chat_latency                     # every configuration
    python -m bench.chat_latency --configs bf16 8bit  # some

Builds (once, cached under bench/.cache) a random checkpoint with the real Mipha-3B sizes in
the original format, then for each configuration runs a conversation about one 384 px photo
twice — naive (re-encode the photo and re-read the conversation every turn, like the original
demo) and with the engine's caches — in a fresh process, so memory peaks are its own. Prints
a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from bench.memory import PeakMemory, read_bandwidth, resident_memory
from mipha_core import CacheKey, load_engine
from mipha_core.engine import CacheSettings, Engine
from mipha_core.llama_cpp_engine import LlamaCppEngine
from mipha_core.tiny import MIPHA_3B, write_tiny_checkpoint

HERE = Path(__file__).parent
CHECKPOINT = HERE / ".cache" / "mipha-3b-random"
RESULTS = HERE / "results"
CONFIGS = {
    "bf16": {"dtype": "bfloat16", "quantization": None},
    "fp32": {"dtype": "float32", "quantization": None},
    "8bit": {"dtype": "bfloat16", "quantization": "8bit"},
    "4bit": {"dtype": "bfloat16", "quantization": "4bit"},
    "llama-int8": {"dtype": "auto", "quantization": "8bit", "runtime": "llama.cpp"},
    "llama-int4": {"dtype": "auto", "quantization": "4bit", "runtime": "llama.cpp"},
}
"""The ``llama-`` configurations run the language model on llama.cpp (Q8_0, Q4_K_M), as ``auto`` does on a CPU."""
QUESTIONS = [
    "What is in this photo?",
    "What colours stand out?",
    "Is there anything unusual about it?",
    "Write a short caption for it.",
]


READING_SECONDS = 1.0
"""A person takes at least this long to read a reply and type the next question; the engine reads
ahead in that time (the reply's end and "USER:"), which questions sent at once would skip."""
TYPING_CHARS_PER_SECOND = 4.0
"""How fast the ``typed`` mode's person types (about 45 words a minute); each keystroke reaches the
engine as a draft, as the page's composer sends it. The photo is dropped first, then the question typed."""


@dataclass(frozen=True)
class TurnFigures:
    vision_seconds: float | None
    first_token_seconds: float
    decode_tokens_per_second: float | None
    prompt_tokens: int
    reused_tokens: int


def build_checkpoint(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    logging.info("building a full-size random Mipha-3B in %s (once)", folder)
    staging = folder.with_name(folder.name + ".partial")
    write_tiny_checkpoint(staging, dims=MIPHA_3B, dtype=torch.bfloat16, max_shard_bytes=1024**3)
    staging.rename(folder)
    return folder


def photo() -> Image.Image:
    source = Image.open(Path(__file__).parent.parent / "assets" / "chelsea.jpg").convert("RGB")
    return source.resize((384, 384))


def converse(engine: Engine | LlamaCppEngine, *, turns: int, reply_tokens: int,
             cache: CacheKey | None = CacheKey("bench", "chat"), typed: bool = False) -> list[TurnFigures]:
    """Ask ``turns`` questions, each ``READING_SECONDS`` after the previous reply ended; ``typed``:
    each question typed at ``TYPING_CHARS_PER_SECOND`` first, the time to first token from Send."""
    image, messages, figures = photo(), [], []
    for index in range(turns):
        if index:
            time.sleep(READING_SECONDS)
        question = QUESTIONS[index % len(QUESTIONS)]
        opening = [{"type": "image", "image": image}] if index == 0 else []
        if typed:
            for typed_chars in range(len(question) + 1):
                draft = {"role": "user", "content": [*opening, {"type": "text", "text": question[:typed_chars]}]}
                engine.prefetch([*messages, draft], max_new_tokens=reply_tokens, cache=cache)
                time.sleep(1 / TYPING_CHARS_PER_SECOND)
        messages.append({"role": "user", "content": [*opening, {"type": "text", "text": question}]})
        reply = engine.stream(messages, max_new_tokens=reply_tokens, temperature=0, cache=cache)
        text = reply.text()
        stats = reply.stats
        figures.append(TurnFigures(
            vision_seconds=stats.vision_seconds,
            first_token_seconds=stats.first_token_seconds,
            decode_tokens_per_second=stats.tokens_per_second,
            prompt_tokens=stats.prompt_tokens,
            reused_tokens=stats.reused_tokens,
        ))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return figures


def reply_in_words(engine: Engine | LlamaCppEngine) -> None:
    """Random weights reply with any tokens; make them reply like Mipha: never the end token (every
    reply its full length) and only tokens that open a word with a space, so a reply starts with a
    space as Mipha's do ("ASSISTANT: The ...") and the next prompt can read it back as generated."""
    words = {token_id for token, token_id in engine.tokenizer.get_vocab().items() if token.startswith("Ġ")}
    others = set(range(len(engine.tokenizer))) - words
    engine.suppressed_ids = sorted(set(engine.suppressed_ids) | others | {engine.end_token_id})


def language_model_bytes(engine: Engine) -> int:
    """Bytes of weights read for one decoded token: every layer, the final norm and the head."""
    parts = [engine.model.model.language_model.layers, engine.model.model.language_model.final_layernorm,
             engine.model.lm_head]
    return sum(t.numel() * t.element_size() for part in parts for t in [*part.parameters(), *part.buffers()])


def run_config(name: str, *, checkpoint: Path, turns: int, reply_tokens: int) -> dict:
    """One configuration, in this process: load, naive conversation, engine conversation."""
    settings = CONFIGS[name]
    if settings.get("runtime") == "llama.cpp":
        return run_llama_cpp_config(name, checkpoint=checkpoint, turns=turns, reply_tokens=reply_tokens)
    started = time.perf_counter()
    with PeakMemory() as peak:
        base = load_engine(str(checkpoint), device="cpu", dtype=settings["dtype"], quantization=settings["quantization"])
        load_seconds = time.perf_counter() - started
        base.stream([{"role": "user", "content": "warm up"}], max_new_tokens=2).text()
        results = {}
        for mode, caches in [("naive", CacheSettings(0, 0)), ("engine", CacheSettings())]:
            engine = Engine(model=base.model, tokenizer=base.tokenizer, preprocessor=base.preprocessor,
                            model_id=base.model_id, context_length=base.context_length,
                            image_tokens=base.image_tokens, caches=caches)
            reply_in_words(engine)
            results[mode] = [asdict(turn) for turn in converse(engine, turns=turns, reply_tokens=reply_tokens)]
    return {
        "config": name, "dtype": str(base.dtype), "load_seconds": load_seconds,
        "weights_bytes_per_token": language_model_bytes(base),
        "peak_anonymous_bytes": peak.anonymous, "peak_file_backed_bytes": peak.file_backed,
        "after_anonymous_bytes": resident_memory().anonymous, "turns": results,
    }


def run_llama_cpp_config(name: str, *, checkpoint: Path, turns: int, reply_tokens: int) -> dict:
    """The language model on llama.cpp: naive is the same engine without a cache key (every turn read whole)."""
    settings = CONFIGS[name]
    started = time.perf_counter()
    with PeakMemory() as peak:
        engine = load_engine(str(checkpoint), device="cpu", quantization=settings["quantization"], runtime="llama.cpp",
                             data_dir=HERE / ".cache" / "data")
        load_seconds = time.perf_counter() - started
        reply_in_words(engine)
        engine.stream([{"role": "user", "content": "warm up"}], max_new_tokens=2).text()
        modes = [("naive", None, False), ("engine", CacheKey("bench", "chat"), False),
                 ("typed", CacheKey("bench-typed", "chat"), True)]
        results = {mode: [asdict(turn) for turn in converse(engine, turns=turns, reply_tokens=reply_tokens,
                                                            cache=cache, typed=typed)]
                   for mode, cache, typed in modes}
    return {
        "config": name, "dtype": engine.label, "load_seconds": load_seconds,
        "weights_bytes_per_token": engine.context.model_bytes,
        "peak_anonymous_bytes": peak.anonymous, "peak_file_backed_bytes": peak.file_backed,
        "after_anonymous_bytes": resident_memory().anonymous, "turns": results,
    }


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit.strip()}


def table(results: list[dict], bandwidth: float) -> str:
    header = (f"{'config':7} {'mode':7} {'vision s':>8} {'TTFT t1':>8} {'TTFT t2-4':>10} {'reused':>7} "
              f"{'decode tok/s':>12} {'limit tok/s':>11} {'of limit':>8} {'anon GB':>7} {'file GB':>7}")
    lines = [header, "-" * len(header)]
    for result in results:
        limit = bandwidth / result["weights_bytes_per_token"]
        for mode, turns in result["turns"].items():
            vision = next((t["vision_seconds"] for t in turns if t["vision_seconds"]), 0.0)
            later = [t["first_token_seconds"] for t in turns[1:]]
            decode = [t["decode_tokens_per_second"] for t in turns if t["decode_tokens_per_second"]]
            speed = sum(decode) / len(decode)
            lines.append(
                f"{result['config']:7} {mode:7} {vision:8.2f} {turns[0]['first_token_seconds']:8.2f} "
                f"{sum(later) / max(len(later), 1):10.2f} {sum(t['reused_tokens'] for t in turns[1:]):7d} "
                f"{speed:12.2f} {limit:11.2f} {speed / limit:8.0%} "
                f"{result['peak_anonymous_bytes'] / 1e9:7.2f} {result['peak_file_backed_bytes'] / 1e9:7.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.worker:
        result = run_config(args.worker, checkpoint=args.checkpoint, turns=args.turns, reply_tokens=args.reply_tokens)
        print(json.dumps(result))
        return
    checkpoint = build_checkpoint(args.checkpoint)
    bandwidth = read_bandwidth()
    logging.info("memory read bandwidth: %.1f GB/s", bandwidth / 1e9)
    results = []
    for name in args.configs:
        logging.info("running %s", name)
        command = [sys.executable, "-m", "bench.chat_latency", "--worker", name, "--checkpoint", str(checkpoint),
                   "--turns", str(args.turns), "--reply-tokens", str(args.reply_tokens)]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=HERE.parent).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    report = {"machine": machine(), "bandwidth_bytes_per_second": bandwidth, "turns": args.turns,
              "reply_tokens": args.reply_tokens, "results": results}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"chat_latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; {args.turns} turns, {args.reply_tokens}-token replies")
    print(table(results, bandwidth))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
