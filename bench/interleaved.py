"""Prompt reading and decoding, ours against llama.cpp's, one repetition of each in turn.

    python -m bench.interleaved                     # int8 (Q8_0), photos read as auto picks, 3 rounds
    python -m bench.interleaved --precision int4 --reader int4 --rounds 5

This project's VM drifts by 10-30% within minutes, so a benchmark that measures ours and then
llama.cpp cannot tell a 5% gap from the drift. Here each round reads a photo-shaped prompt of 771
positions with the engine's ``LlamaCppContext`` as the engine does (one batch of embeddings in its
reader, on the ``--reader`` weights: the text's rows of the token table
around the 729 image features), then runs ``llama-bench -p 771 -n 0 -r 1`` at its default
(flash attention auto) on the ``--precision`` GGUF file, and on the 16-bit one auto reads photos
on here for reference (BF16 where the CPU has native bf16, else F16). Then ours decodes 32 tokens
after that prompt as a greedy reply does (the move to the decoder, logits, the sampler, the token
read back) against ``llama-bench -p 0 -n 32 -d 771`` with flash attention off and auto. The vision tower is not run:
the comparison adds our vision time to both sides. Needs the llama.cpp build cached by ``python -m
bench.llama_cpp``. Prints every round and the medians; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.chat_latency import CHECKPOINT, HERE, RESULTS, build_checkpoint, machine
from bench.llama_cpp import cpu_flags
from bench.llama_cpp_build import existing_llama_cpp
from bench.memory import read_bandwidth
from mipha_core.checkpoint import read_checkpoint_config
from mipha_core.generation import GenerationParams, TokenSampler
from mipha_core.gguf_export import GGUF_PRECISIONS, language_model_gguf
from mipha_core.llama_cpp_runtime import LlamaCppContext, physical_cores
from mipha_core.precision import photo_reader_weights

IMAGE_POSITIONS = 729
TEXT_BEFORE, TEXT_AFTER = 32, 10
"""The bench's first turn: Mipha's system sentence and "USER: " before the photo, the question after."""
PROMPT_POSITIONS = TEXT_BEFORE + IMAGE_POSITIONS + TEXT_AFTER
REPLY_TOKENS = 32


def ours(context: LlamaCppContext, features: torch.Tensor) -> float:
    """Positions per second reading the photo prompt from an empty context, as the engine reads it."""
    context.truncate(0)
    started = time.perf_counter()
    context.read([list(range(1000, 1000 + TEXT_BEFORE)), features, list(range(2000, 2000 + TEXT_AFTER))],
                 logits_for_last=True)
    return PROMPT_POSITIONS / (time.perf_counter() - started)


def ours_decode(context: LlamaCppContext) -> float:
    """Tokens per second of a greedy reply after the prompt ``ours`` left, as the engine generates it."""
    sampler = TokenSampler(GenerationParams(max_new_tokens=REPLY_TOKENS, temperature=0.0), suppressed_ids=[])
    started = time.perf_counter()
    for _ in range(REPLY_TOKENS):
        context.read_tokens([sampler(context.last_logits())], logits_for_last=True)
    return REPLY_TOKENS / (time.perf_counter() - started)


def llama_bench(tool: str, gguf: Path, *, threads: int, flash_attention: str, decode: bool = False) -> float:
    test = ["-p", "0", "-n", str(REPLY_TOKENS), "-d", str(PROMPT_POSITIONS)] if decode else \
        ["-p", str(PROMPT_POSITIONS), "-n", "0"]
    output = subprocess.run([tool, "-m", str(gguf), *test, "-t", str(threads), "-r", "1", "-fa", flash_attention,
                             "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(output)[0]["avg_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["int8", "int4"], default="int8")
    parser.add_argument("--reader", choices=["bf16", "fp16", "int8", "int4", "none"], default=photo_reader_weights(),
                        help="the weights photos are read on (default: auto's first choice here); none: no photo reader")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sixteen_bit = photo_reader_weights()
    checkpoint = build_checkpoint(CHECKPOINT)
    config = read_checkpoint_config(checkpoint)
    ggufs = {precision: language_model_gguf(checkpoint, config, precision=GGUF_PRECISIONS[precision],
                                            cache_dir=HERE / ".cache" / "data" / "gguf")
             for precision in (sixteen_bit, args.precision, args.reader) if precision != "none"}
    gguf = ggufs[args.precision]
    tool = str(existing_llama_cpp().tool("llama-bench"))
    threads = physical_cores()
    context = LlamaCppContext(gguf, context_length=config.context_length, threads=threads,
                              bulk_positions=0 if args.reader == "none" else None,
                              reader_path=ggufs.get(args.reader))
    features = torch.randn(IMAGE_POSITIONS, context.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    ours(context, features)  # the first read pages the weights in
    rounds = []
    for index in range(args.rounds):
        sample = {"ours": ours(context, features), "ours_decode": ours_decode(context),
                  "llama_cpp_fa_auto": llama_bench(tool, gguf, threads=threads, flash_attention="auto"),
                  "llama_cpp_16bit_fa_auto": llama_bench(tool, ggufs[sixteen_bit], threads=threads,
                                                         flash_attention="auto")}
        for flash_attention in ("off", "auto"):
            sample[f"llama_cpp_decode_fa_{flash_attention}"] = llama_bench(
                tool, gguf, threads=threads, flash_attention="0" if flash_attention == "off" else "auto", decode=True)
        rounds.append(sample)
        print(f"round {index + 1}: prompt ours {sample['ours']:.2f}, llama.cpp {sample['llama_cpp_fa_auto']:.2f} "
              f"({sixteen_bit} {sample['llama_cpp_16bit_fa_auto']:.2f}); decode ours {sample['ours_decode']:.2f}, "
              f"llama.cpp fa off {sample['llama_cpp_decode_fa_off']:.2f} / auto "
              f"{sample['llama_cpp_decode_fa_auto']:.2f} tok/s", flush=True)
    context.close()
    medians = {name: statistics.median(sample[name] for sample in rounds) for name in rounds[0]}
    ratios = {kind: [sample[ours_key] / sample[peer_key] for sample in rounds]
              for kind, ours_key, peer_key in (("prompt", "ours", "llama_cpp_fa_auto"),
                                               ("decode", "ours_decode", "llama_cpp_decode_fa_auto"))}
    report = {"machine": {**machine(), "cpu_flags": cpu_flags()}, "bandwidth_bytes_per_second": read_bandwidth(),
              "precision": args.precision, "reader": args.reader, "gguf": gguf.name, "threads": threads,
              "rounds": rounds,
              "medians": medians, "ratios_to_fa_auto": ratios}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"interleaved-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"{report['machine']['cpu']}; flags {' '.join(report['machine']['cpu_flags'])}; {threads} threads; "
          f"memory read bandwidth {report['bandwidth_bytes_per_second'] / 1e9:.1f} GB/s")
    print(f"prompt medians: ours {medians['ours']:.2f}, llama.cpp {medians['llama_cpp_fa_auto']:.2f} ({sixteen_bit} "
          f"{medians['llama_cpp_16bit_fa_auto']:.2f}) tok/s; ours / llama.cpp per round: "
          + ", ".join(f"{ratio:.2f}" for ratio in ratios["prompt"]))
    print(f"decode medians: ours {medians['ours_decode']:.2f}, llama.cpp fa off "
          f"{medians['llama_cpp_decode_fa_off']:.2f}, fa auto {medians['llama_cpp_decode_fa_auto']:.2f} tok/s; "
          "ours / fa auto per round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios["decode"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
