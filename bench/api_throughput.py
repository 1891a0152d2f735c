"""How many replies one app process gives per minute, through its `/v1` API, as clients are added.

    python -m bench.api_throughput                          # full-size random Mipha-3B, 1, 2 and 4 clients
    python -m bench.api_throughput --clients 1 2 --load-8bit --concurrency 2

Starts `launch.py` on the bench's full-size random checkpoint (built once under bench/.cache, see
`bench.chat_latency`) with the API on, then for each client count runs that many clients at once.
Each client has its own key (so its own caches) and holds a short conversation about a 384-px
photo: a first turn with the photo, then follow-ups that resend the conversation, as chat apps do.
Prints replies per minute and the time to the first token of first turns and of follow-ups, with
the CPU named; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from PIL import Image

from bench.chat_latency import CHECKPOINT, QUESTIONS, build_checkpoint, machine
from tests.app_process import app_env, free_port, wait_for_http

HERE = Path(__file__).parent
RESULTS = HERE / "results"
log = logging.getLogger("bench.api_throughput")
REPO = HERE.parent


@dataclass(frozen=True)
class Turn:
    client: int
    index: int
    first_token_seconds: float
    seconds: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


def photo_uri(client: int) -> str:
    """A different 384-px photo per client (a shifted crop), so no client reuses another's features."""
    source = Image.open(REPO / "assets" / "chelsea.jpg").convert("RGB")
    crop = source.crop((client * 7, 0, source.width, source.height)).resize((384, 384))
    buffer = io.BytesIO()
    crop.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def converse(base_url: str, key: str, client: int, *, turns: int, max_tokens: int) -> list[Turn]:
    api = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=1800)
    model = api.models.list().data[0].id
    messages: list[dict] = []
    figures = []
    for index in range(turns):
        question = QUESTIONS[index % len(QUESTIONS)]
        content = [{"type": "text", "text": question}]
        if index == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": photo_uri(client)}})
        messages.append({"role": "user", "content": content})
        started = time.perf_counter()
        first = None
        text, usage = "", None
        for chunk in api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        ended = time.perf_counter()
        figures.append(Turn(client=client, index=index, first_token_seconds=(first or ended) - started,
                            seconds=ended - started, completion_tokens=usage.completion_tokens,
                            prompt_tokens=usage.prompt_tokens,
                            cached_tokens=usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": text})
    return figures


def cpu_flags() -> list[str]:
    """The vector and matrix extensions that decide CPU speed here."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"})


def run_clients(base_url: str, keys: list[str], *, clients: int, turns: int, max_tokens: int) -> dict:
    results: list[list[Turn]] = [[] for _ in range(clients)]

    def one(client: int) -> None:
        results[client] = converse(base_url, keys[client], client, turns=turns, max_tokens=max_tokens)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(client,)) for client in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    every = [turn for figures in results for turn in figures]
    firsts = [t.first_token_seconds for t in every if t.index == 0]
    follow_ups = [t.first_token_seconds for t in every if t.index > 0]
    return {
        "clients": clients, "replies": len(every), "wall_seconds": wall,
        "replies_per_minute": len(every) / wall * 60,
        "first_turn_ttft_median": statistics.median(firsts), "first_turn_ttft_max": max(firsts),
        "follow_up_ttft_median": statistics.median(follow_ups) if follow_ups else None,
        "follow_up_ttft_max": max(follow_ups) if follow_ups else None,
        "turns": [asdict(t) for t in every],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the full-size random one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--turns", type=int, default=2, help="turns per client conversation")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=1)
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-8bit", action="store_true")
    quant.add_argument("--load-4bit", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    model = args.model or str(build_checkpoint(CHECKPOINT))
    keys = [f"bench-client-{n}-key-0123456789" for n in range(max(args.clients))]
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="mipha-bench-"))
    command = [sys.executable, "launch.py", "--model", model, "--device", "cpu", "--data-dir", str(data_dir),
               "--port", str(port), "--concurrency", str(args.concurrency), "--api-queue", "64",
               *(["--load-8bit"] if args.load_8bit else []), *(["--load-4bit"] if args.load_4bit else [])]
    server_log = data_dir / "server.log"
    with server_log.open("w") as out:
        server = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env=app_env({"MIPHA_API_KEYS": " ".join(keys)}))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", server, timeout=600, log=server_log)
        base_url = f"http://127.0.0.1:{port}/v1"
        probe = openai.OpenAI(base_url=base_url, api_key=keys[0], max_retries=0, timeout=1800)
        while True:  # the page comes up before the weights: wait until the model answers
            try:
                probe.chat.completions.create(model=probe.models.list().data[0].id,
                                              messages=[{"role": "user", "content": "warm up"}],
                                              max_tokens=2)
                break
            except openai.APIStatusError as e:
                if e.status_code != 503:
                    raise
                time.sleep(2)
        runs = []
        for clients in args.clients:
            log.info("%d client(s) at once …", clients)
            runs.append(run_clients(base_url, keys, clients=clients, turns=args.turns, max_tokens=args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=60)
    precision = "int8" if args.load_8bit else "int4" if args.load_4bit else "auto"
    report = {"machine": {**machine(), "flags": cpu_flags()}, "python": platform.python_version(),
              "precision": precision, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "turns": args.turns, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    out_file = RESULTS / f"api-throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.write_text(json.dumps(report, indent=2))
    print(f"{report['machine']['cpu']} ({', '.join(report['machine']['flags']) or 'no AVX-512'}), "
          f"{report['machine']['cores']} cores; precision {precision}, --concurrency {args.concurrency}, "
          f"{args.turns} turns of {args.max_tokens} tokens per client")
    print("| clients | replies/min | first turn: first token (median / max) | follow-up: first token (median / max) |")
    print("|---|---|---|---|")
    for run in runs:
        follow = (f"{run['follow_up_ttft_median']:.1f} s / {run['follow_up_ttft_max']:.1f} s"
                  if run["follow_up_ttft_median"] is not None else "–")
        print(f"| {run['clients']} | {run['replies_per_minute']:.2f} | {run['first_turn_ttft_median']:.1f} s / "
              f"{run['first_turn_ttft_max']:.1f} s | {follow} |")
    print(f"JSON: {out_file}")


if __name__ == "__main__":
    main()
