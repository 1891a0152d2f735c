"""How soon Stop ends a first turn while the photo and question are still being read, on the CPU default.

    python -m bench.stop_during_prompt                  # int8 on llama.cpp, Stop at 1, 3 and 6 s
    python -m bench.stop_during_prompt --precision int4 --after 2 5

Loads the bench's full-size random Mipha-3B (``bench.chat_latency.build_checkpoint``) as ``auto``
does on a CPU (the language model on llama.cpp), starts a first turn with the photo, sets the
reply's cancel event after each delay and measures how long the reply takes to end after that.
Then it reads the same prompt uninterrupted, whose prompt speed (positions / (time to first token
− vision time)) is the cost side: llama.cpp polls the stop flag between graph nodes, so the
reading is not split into chunks; compare that speed with llama-bench's (``bench.llama_cpp``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from pathlib import Path

from bench.chat_latency import CHECKPOINT, HERE, RESULTS, build_checkpoint, machine, photo
from mipha_core import load_engine

QUESTION = "What is in this photo?"


def stop_after(engine, delay: float) -> dict:
    """Start a first turn, press Stop after ``delay`` seconds; how long until the reply ended."""
    cancel = threading.Event()
    messages = [{"role": "user", "content": [{"type": "image", "image": photo()}, {"type": "text", "text": QUESTION}]}]
    reply = engine.stream(messages, max_new_tokens=32, temperature=0, cancel=cancel)
    timer = threading.Timer(delay, cancel.set)
    started = time.perf_counter()
    timer.start()
    text = reply.text()
    ended = time.perf_counter()
    timer.join()
    return {"stop_after_seconds": delay, "ended_after_stop_seconds": ended - started - delay,
            "finish_reason": reply.stats.finish_reason, "tokens": reply.stats.completion_tokens, "text": text}


def full_read(engine) -> dict:
    messages = [{"role": "user", "content": [{"type": "image", "image": photo()}, {"type": "text", "text": QUESTION}]}]
    reply = engine.stream(messages, max_new_tokens=1, temperature=0)
    reply.text()
    stats = reply.stats
    return {"prompt_tokens": stats.prompt_tokens, "vision_seconds": stats.vision_seconds,
            "first_token_seconds": stats.first_token_seconds,
            "prompt_tokens_per_second": stats.prompt_tokens / (stats.first_token_seconds - stats.vision_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["int8", "int4"], default="int8")
    parser.add_argument("--after", type=float, nargs="+", default=[1.0, 3.0, 6.0], help="seconds before Stop")
    parser.add_argument("--reads", type=int, default=3, help="uninterrupted reads for the prompt speed")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("mipha_core.llama_cpp_runtime").setLevel(logging.WARNING)
    checkpoint = build_checkpoint(args.checkpoint)
    engine = load_engine(str(checkpoint), device="cpu", runtime="llama.cpp",
                         quantization="8bit" if args.precision == "int8" else "4bit", data_dir=HERE / ".cache" / "data")
    engine.stream([{"role": "user", "content": "warm up"}], max_new_tokens=2).text()
    stops = [stop_after(engine, delay) for delay in args.after]
    reads = [full_read(engine) for _ in range(args.reads)]
    speeds = [read["prompt_tokens_per_second"] for read in reads]
    report = {"machine": machine(), "engine": engine.label, "stops": stops, "reads": reads,
              "prompt_tokens_per_second_median": statistics.median(speeds)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"stop_during_prompt-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"{report['machine']['cpu']}; {engine.label}")
    for stop in stops:
        print(f"Stop at {stop['stop_after_seconds']:.1f} s: the reply ended {stop['ended_after_stop_seconds']:.2f} s "
              f"later ({stop['finish_reason']}, {stop['tokens']} tokens)")
    print(f"uninterrupted: {reads[0]['prompt_tokens']} positions at {min(speeds):.1f}-{max(speeds):.1f} tok/s "
          f"(median {statistics.median(speeds):.1f}), vision {statistics.median(r['vision_seconds'] for r in reads):.2f} s")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
