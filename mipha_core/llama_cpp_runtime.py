"""llama.cpp's C API (through llama-cpp-python's ctypes bindings) for one language model and one context.

``LlamaCppContext`` holds a GGUF model and a context with a single sequence, and offers what the
engine needs: read token ids or input embeddings at the next positions, the last position's
logits, cut the sequence back to a prefix, and snapshot or restore it. Everything else
(tokenizing, sampling, which prefix to keep) stays in Python, so the prompt and the sampler
are the ones the PyTorch path uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from mipha_core.errors import MiphaError, ModelLoadError

logger = logging.getLogger(__name__)

BATCH_TOKENS = 2048
"""Positions handed to one ``llama_decode`` (llama-bench's default batch); llama.cpp computes them
in micro-batches of ``MICRO_BATCH_TOKENS``."""
MICRO_BATCH_TOKENS = 512
FLASH_ATTENTION = False
"""llama.cpp's CPU flash-attention kernel decodes slowly after a long prompt: on a 2-core AVX2 EPYC
(Q8_0, 771 positions of photo and question read) 5.0 tok/s with it against 6.7 without, while it
reads the prompt only ~3% faster (25.0 against 24.3 tok/s). A chat reply decodes tens to hundreds
of tokens after the photo, so it is off; llama.cpp's own default ("auto") turns it on."""


class DecodeAbortedError(MiphaError):
    """``abort()`` was called while llama.cpp was computing; what it had finished is kept."""


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python can be used here, otherwise why not (for the log line)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as error:
        return f"llama-cpp-python is not usable here ({error})"
    return None


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once where Linux says which are siblings."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return max((os.cpu_count() or 2) // 2, 1)
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(len(cores), 1)


class LlamaCppContext:
    """A GGUF model with one context of ``context_length`` positions, on ``threads`` CPU threads.

    Not thread-safe: one reply at a time uses it (``LlamaCppEngine`` holds a lock); only
    ``abort`` may be called from another thread.
    """

    def __init__(self, path: Path, *, context_length: int, threads: int) -> None:
        import llama_cpp

        self._api = llama_cpp
        _route_logs_once()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}: delete the file to have it rebuilt, "
                                 "or use --runtime torch")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context_length
        context_params.n_batch = BATCH_TOKENS
        context_params.n_ubatch = MICRO_BATCH_TOKENS
        context_params.n_seq_max = 1
        context_params.flash_attn_type = int(FLASH_ATTENTION)
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        context_params.no_perf = True
        self._context = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._context:
            llama_cpp.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not make a {context_length}-position context: "
                                 "free some memory, or use --runtime torch")
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.model_bytes = llama_cpp.llama_model_size(self._model)  # all read for every decoded token
        self.hidden_size = llama_cpp.llama_model_n_embd(self._model)
        self._memory = llama_cpp.llama_get_memory(self._context)
        self._abort_flag = ctypes.create_string_buffer(2)
        self._abort_check = _flag_reader()
        llama_cpp.llama_set_abort_callback(self._context, self._abort_check,
                                           ctypes.cast(self._abort_flag, ctypes.c_void_p))
        self._lock = threading.Lock()

    @property
    def length(self) -> int:
        """How many positions the sequence holds."""
        return int(self._api.llama_memory_seq_pos_max(self._memory, 0)) + 1

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions and forget the rest."""
        self._api.llama_memory_seq_rm(self._memory, 0, length, -1)

    def read_tokens(self, token_ids: Sequence[int], *, logits_for_last: bool) -> None:
        """Read ``token_ids`` at the positions after the sequence; ``DecodeAbortedError`` on ``abort``."""
        for start in range(0, len(token_ids), BATCH_TOKENS):
            chunk = np.asarray(token_ids[start:start + BATCH_TOKENS], dtype=np.int32)
            last = logits_for_last and start + len(chunk) == len(token_ids)
            self._decode(tokens=chunk, embeddings=None, logits_for_last=last)

    def read_embeddings(self, rows: torch.Tensor, *, logits_for_last: bool) -> None:
        """Read input embeddings (``(positions, hidden)``, e.g. projected image features) after the sequence."""
        values = rows.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        for start in range(0, len(values), BATCH_TOKENS):
            chunk = values[start:start + BATCH_TOKENS]
            last = logits_for_last and start + len(chunk) == len(values)
            self._decode(tokens=None, embeddings=chunk, logits_for_last=last)

    def last_logits(self) -> torch.Tensor:
        """The next-token logits after the last position read (a copy, float32)."""
        pointer = self._api.llama_get_logits_ith(self._context, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy())

    def snapshot(self) -> bytes:
        """The sequence's state (its KV cache), to ``restore`` later in this context."""
        size = self._api.llama_state_seq_get_size(self._context, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = self._api.llama_state_seq_get_data(self._context, buffer, size, 0)
        return bytes(memoryview(buffer)[:written])

    def restore(self, state: bytes) -> bool:
        """Replace the sequence with a ``snapshot``; False when llama.cpp refused it (the sequence is then empty)."""
        self.truncate(0)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._api.llama_state_seq_set_data(self._context, buffer, len(state), 0) == 0:
            self.truncate(0)
            return False
        return True

    def abort(self) -> None:
        """Make the computation in progress (and every later one, until ``resume``) stop at its next step."""
        self._abort_flag[0] = b"x"

    def resume(self) -> None:
        self._abort_flag[0] = b"\0"

    def close(self) -> None:
        with self._lock:
            if self._context:
                self._api.llama_free(self._context)
                self._context = None
            if self._model:
                self._api.llama_model_free(self._model)
                self._model = None

    def _decode(self, *, tokens: np.ndarray | None, embeddings: np.ndarray | None, logits_for_last: bool) -> None:
        api = self._api
        count = len(tokens) if tokens is not None else len(embeddings)
        start = self.length
        batch = api.llama_batch_init(count, 0 if embeddings is None else embeddings.shape[1], 1)
        try:
            if tokens is not None:
                ctypes.memmove(batch.token, tokens.ctypes.data, tokens.nbytes)
            else:
                flat = np.ascontiguousarray(embeddings, dtype=np.float32)
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            positions = np.arange(start, start + count, dtype=np.int32)
            ctypes.memmove(batch.pos, positions.ctypes.data, positions.nbytes)
            for index in range(count):
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = 0
                batch.logits[index] = 0
            batch.logits[count - 1] = 1 if logits_for_last else 0
            batch.n_tokens = count
            status = api.llama_decode(self._context, batch)
        finally:
            api.llama_batch_free(batch)
        if status == 2:
            raise DecodeAbortedError("reading was stopped")
        if status != 0:
            raise MiphaError(f"llama.cpp could not read the prompt (llama_decode returned {status}): "
                             "start a new chat, or restart with --runtime torch")


@cache
def _flag_reader():
    """A C function that says whether a 2-byte flag buffer is set, for ``llama_set_abort_callback``.

    llama.cpp polls the callback between graph nodes on its compute thread. A Python callback
    would take the GIL there hundreds of times a token, and wait for it whenever another thread
    runs Python; C's ``strlen`` on the flag buffer answers 0 (go on) or 1 (stop) without it. The
    callback returns ``bool``, which every C ABI reads from the low byte of the returned integer.
    """
    import llama_cpp

    library = ctypes.util.find_library("c") or ("msvcrt" if os.name == "nt" else None)
    strlen = ctypes.CDLL(library).strlen
    return ctypes.cast(strlen, llama_cpp.ggml_abort_callback)


@cache
def _route_logs_once():
    """llama.cpp's log lines go to this module's logger at DEBUG (warnings and errors at their level)."""
    import llama_cpp

    levels = {3: logging.WARNING, 4: logging.ERROR}

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        message = text.decode(errors="replace").rstrip()
        if message:
            logger.log(levels.get(level, logging.DEBUG), "llama.cpp: %s", message)

    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
    return forward
