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
from mipha_core.llama_cpp_state import StateLayoutError, flip_value_layout

logger = logging.getLogger(__name__)

BATCH_TOKENS = 2048
"""Positions handed to one ``llama_decode`` (llama-bench's default batch); llama.cpp computes them
in micro-batches of ``MICRO_BATCH_TOKENS``."""
MICRO_BATCH_TOKENS = 512
BULK_READ_POSITIONS = 256
"""Reads of at least this many positions (a photo's 729) go to a second context with flash attention,
on the decoder's own weights.

llama.cpp's CPU flash-attention kernel reads a long batch faster but decodes slowly: on a 2-core
AVX2 EPYC (Q8_0, the bench's 771-position photo prompt, four alternating rounds) it read 21.0 tok/s
against 19.0 without, but decoded 3.1 tok/s against 4.9 and read a 20-token question in 2.2 s
against 1.1. So a photo is read with it and everything else without, and the sequence moves
between the two contexts (``llama_cpp_state``) only when the side changes, and then only the
positions the other side lacks, through one buffer made ready at load: 0.15-0.2 s for a photo's
729, milliseconds for a reply."""
WIDE_READ_POSITIONS = 8
"""Reads of at least this many positions go to a reader on 16-bit weights (without flash attention).

A batch is bound by arithmetic, where llama.cpp's 16-bit kernels beat its Q8_0 and Q4_K ones, while a
decoded token is bound by reading the weights, where the quantized files' smaller size wins. At 800
positions deep, without flash attention, on a 2-core AVX512-BF16 EPYC (four rounds, seconds): 10
positions took 0.40 on BF16 against 0.55-0.65 on Q8_0 and 0.50-0.64 on Q4_K_M; 23 positions 0.58-0.68
against 0.85-1.08 and 0.78-0.96; 40 positions 0.98-1.16 against 1.43-2.03 and 1.26-1.57; below 8 the
quantized files were as fast or faster (1 position: 0.15-0.29 on Q8_0, 0.26-0.67 on BF16). On a
2-core AVX2 EPYC (an earlier session, F16 since it has no native bf16): 14 positions 0.83-0.86
against 0.88-1.01 on Q8_0, 23 positions 1.10-1.43 against 1.52-1.56, 1 position 0.37 against 0.27,
so the crossing is near there too. So a follow-up question, not only a photo, is read on the 16-bit
weights. Without flash attention the 16-bit kernels read the photo as fast (llama-bench, 771
positions, the AVX512-BF16 EPYC: BF16 42.0 tok/s against 42.7 with it, F16 28.1 against 28.9), and
the two contexts keep V alike, so a move is a plain copy."""


PREPARED_MOVE_POSITIONS = 1024
"""Positions the buffer for moves between the contexts is made ready for at load (a photo prompt
is about 770): 335 MB for Mipha-3B, so the first move after a photo is not slowed by page faults."""
_STAGING_SEQUENCE = 1
"""A second sequence id, held only for the moment a range of positions is copied between contexts:
llama.cpp saves and restores whole sequences, so the range is first made a sequence of its own."""


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
    """A GGUF model with one sequence of up to ``context_length`` positions, on ``threads`` CPU threads.

    Two llama.cpp contexts hold the sequence's KV cache: a decoder without flash attention, and a
    reader for reads of ``bulk_positions`` or more (0 turns the reader off). The reader runs on the
    weights in ``reader_path`` where given (the same model in another number format, e.g. BF16
    beside a Q8_0 decoder), without flash attention, for reads of ``WIDE_READ_POSITIONS`` or more
    unless told otherwise; or on the decoder's own weights, with flash attention, for reads of
    ``BULK_READ_POSITIONS`` or more. One of them holds the sequence; the other holds a prefix of
    it, and gets the rest only when a read needs that side. Snapshots are always in the decoder's
    layout.

    Not thread-safe: one reply at a time uses it (``LlamaCppEngine`` holds a lock); only
    ``abort`` may be called from another thread.
    """

    def __init__(self, path: Path, *, context_length: int, threads: int,
                 bulk_positions: int | None = None, reader_path: Path | None = None) -> None:
        import llama_cpp

        self._api = llama_cpp
        _route_logs_once()
        _warn_of_openmp_once()
        llama_cpp.llama_backend_init()
        self._lock = threading.Lock()
        self._abort_flag = ctypes.create_string_buffer(2)
        self._models: list[ctypes.c_void_p] = []
        self._contexts: list[ctypes.c_void_p] = []
        self._model = self._load_model(path)
        same_weights = reader_path is None or reader_path == path
        self._reader_flash_attention = same_weights
        """A reader on the decoder's own weights wins only with flash attention, and keeps V transposed
        the other way (``llama_cpp_state``); one on 16-bit weights wins without it."""
        if bulk_positions is None:
            bulk_positions = BULK_READ_POSITIONS if same_weights else WIDE_READ_POSITIONS
        reader_model = self._load_model(reader_path) if bulk_positions and not same_weights else self._model
        self._decoder = self._new_context(self._model, context_length, threads, flash_attention=False)
        self._reader = (self._new_context(reader_model, context_length, threads,
                                          flash_attention=self._reader_flash_attention)
                        if bulk_positions else None)
        self.bulk_positions = bulk_positions
        self._holder = self._decoder
        self._last_read = self._decoder
        self._both_hold = 0
        """How many first positions the two contexts hold alike."""
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.model_bytes = llama_cpp.llama_model_size(self._model)  # all read for every decoded token
        self.hidden_size = llama_cpp.llama_model_n_embd(self._model)
        self._move_buffer = np.empty(0, dtype=np.uint8)
        if self._reader is not None:
            self._move_buffer_for(min(context_length, PREPARED_MOVE_POSITIONS) * self._state_bytes_per_position())
        self._token_tables = {self._decoder: TokenTable(path)}
        if self._reader is not None:
            self._token_tables[self._reader] = (TokenTable(reader_path) if reader_model != self._model
                                                else self._token_tables[self._decoder])

    @property
    def length(self) -> int:
        """How many positions the sequence holds."""
        return self._length(self._holder)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions and forget the rest."""
        self._api.llama_memory_seq_rm(self._api.llama_get_memory(self._holder), 0, length, -1)
        self._both_hold = min(self._both_hold, length)

    def read_tokens(self, token_ids: Sequence[int], *, logits_for_last: bool) -> None:
        """Read ``token_ids`` at the positions after the sequence; ``DecodeAbortedError`` on ``abort``."""
        context = self._side_for(len(token_ids))
        for start in range(0, len(token_ids), BATCH_TOKENS):
            chunk = np.asarray(token_ids[start:start + BATCH_TOKENS], dtype=np.int32)
            last = logits_for_last and start + len(chunk) == len(token_ids)
            self._decode(context, tokens=chunk, embeddings=None, logits_for_last=last)

    def read_embeddings(self, rows: torch.Tensor, *, logits_for_last: bool) -> None:
        """Read input embeddings (``(positions, hidden)``, e.g. projected image features) after the sequence."""
        values = rows.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        self._read_rows(self._side_for(len(values)), values, logits_for_last=logits_for_last)

    def _read_rows(self, context, values: np.ndarray, *, logits_for_last: bool) -> None:
        for start in range(0, len(values), BATCH_TOKENS):
            chunk = values[start:start + BATCH_TOKENS]
            last = logits_for_last and start + len(chunk) == len(values)
            self._decode(context, tokens=None, embeddings=chunk, logits_for_last=last)

    def read(self, parts: Sequence[Sequence[int] | torch.Tensor], *, logits_for_last: bool) -> None:
        """Read token ids and input embeddings in their order after the sequence.

        Where any part is embeddings (a photo), the whole is one batch of embeddings, the text as
        its rows of the reading model's own token table: the photo and the question after it are then one
        ``llama_decode`` in the photo reader, and the question needs no separate small batch (about
        15% slower per position) nor a move to the decoder before the first token."""
        parts = [part for part in parts if len(part)]
        if not any(isinstance(part, torch.Tensor) for part in parts):
            self.read_tokens([token for part in parts for token in part], logits_for_last=logits_for_last)
            return
        context = self._side_for(sum(len(part) for part in parts))
        table = self._token_tables[context]
        rows = [part.detach().to(device="cpu", dtype=torch.float32).numpy() if isinstance(part, torch.Tensor)
                else table.rows(part) for part in parts]
        self._read_rows(context, np.ascontiguousarray(np.concatenate(rows)), logits_for_last=logits_for_last)

    def last_logits(self) -> torch.Tensor:
        """The next-token logits after the last position read (a copy, float32)."""
        pointer = self._api.llama_get_logits_ith(self._last_read, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy())

    def snapshot(self) -> np.ndarray:
        """The sequence's state (its KV cache, read-only bytes), to ``restore`` later in this context.

        Kept as the array llama.cpp wrote it into: a copy to ``bytes`` doubled the memory for a
        moment and, for a photo conversation's 250 MB, the time of a switch between conversations."""
        self._move_to(self._decoder)
        state = self._state_of(self._decoder)
        state.flags.writeable = False
        return state

    def restore(self, state: np.ndarray) -> bool:
        """Replace the sequence with a ``snapshot``; False when llama.cpp refused it (the sequence is then empty)."""
        self._holder = self._decoder
        self._both_hold = 0
        self.truncate(0)
        if not self._put_state(self._decoder, state):
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
            for context in self._contexts:
                self._api.llama_free(context)
            self._contexts = []
            for model in self._models:
                self._api.llama_model_free(model)
            self._models = []

    def _load_model(self, path: Path):
        api = self._api
        params = api.llama_model_default_params()
        params.n_gpu_layers = 0
        model = api.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            self.close()
            raise ModelLoadError(f"llama.cpp could not load {path}: delete the file to have it rebuilt, "
                                 "or use --runtime torch")
        self._models.append(model)
        return model

    def _new_context(self, model, context_length: int, threads: int, *, flash_attention: bool):
        api = self._api
        params = api.llama_context_default_params()
        params.n_ctx = context_length
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = MICRO_BATCH_TOKENS
        params.n_seq_max = 2  # the conversation, and _STAGING_SEQUENCE
        params.kv_unified = True  # one cell pool, so the staging sequence shares cells instead of copying them
        params.flash_attn_type = int(flash_attention)
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        context = api.llama_init_from_model(model, params)
        if not context:
            self.close()
            raise ModelLoadError(f"llama.cpp could not make a {context_length}-position context: "
                                 "free some memory, or use --runtime torch")
        self._contexts.append(context)
        api.llama_set_abort_callback(context, _flag_reader(), ctypes.cast(self._abort_flag, ctypes.c_void_p))
        return context

    def _side_for(self, positions: int):
        """The context to read ``positions`` more with, holding the sequence."""
        bulk = self._reader is not None and positions >= self.bulk_positions
        self._move_to(self._reader if bulk else self._decoder)
        return self._holder

    def _move_to(self, context) -> None:
        """Make ``context`` hold the sequence: cut back what it holds beyond the shared prefix, then
        copy over only the positions it lacks (their V layout flipped where the two keep it differently).

        After a photo that is the whole photo prompt; after a reply, only the reply's positions, so
        a question read on the other side costs milliseconds to move, not a quarter of a second."""
        if context == self._holder:
            return
        length, shared = self.length, self._both_hold
        self._api.llama_memory_seq_rm(self._api.llama_get_memory(context), 0, shared, -1)
        if shared < length:
            state = self._suffix_state(self._holder, shared)
            try:
                if self._reader_flash_attention:
                    flip_value_layout(state)
            except StateLayoutError:
                logger.warning("llama.cpp's state layout is not the one expected: reading everything without "
                               "flash attention from now on", exc_info=True)
                self._reader = None
                return
            if not self._append_state(context, state):
                self._api.llama_memory_seq_rm(self._api.llama_get_memory(context), 0, shared, -1)
                raise MiphaError("llama.cpp could not move the conversation between its contexts: "
                                 "start a new chat, or restart with --runtime torch")
        self._holder = context
        self._both_hold = length

    def _suffix_state(self, context, start: int) -> np.ndarray:
        """The state of the sequence's positions from ``start`` on, through the staging sequence."""
        memory = self._api.llama_get_memory(context)
        self._api.llama_memory_seq_cp(memory, 0, _STAGING_SEQUENCE, start, -1)
        try:
            size = self._api.llama_state_seq_get_size(context, _STAGING_SEQUENCE)
            state = self._move_buffer_for(size)
            written = self._api.llama_state_seq_get_data(context, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                         size, _STAGING_SEQUENCE)
            return state[:written]
        finally:
            self._api.llama_memory_seq_rm(memory, _STAGING_SEQUENCE, -1, -1)

    def _move_buffer_for(self, size: int) -> np.ndarray:
        """``size`` bytes of the buffer every move reuses, grown (and its memory touched) when short.

        A fresh region for a photo's 250 MB took 0.5-0.8 s to fault in, on every move after a photo
        (measured on a 2-core EPYC); a reused one is written in 0.04 s."""
        if len(self._move_buffer) < size:
            self._move_buffer = np.empty(0, dtype=np.uint8)
            self._move_buffer = np.empty(size, dtype=np.uint8)
            self._move_buffer.fill(0)  # fresh pages are mapped on first touch: touch them now, not in the first move
        return self._move_buffer[:size]

    def _state_bytes_per_position(self) -> int:
        """About what one position adds to a saved state: its K and V rows in every layer (F16), and its cell."""
        api, model = self._api, self._model
        head_bytes = api.llama_model_n_embd(model) // api.llama_model_n_head(model) * 2
        return api.llama_model_n_layer(model) * 2 * api.llama_model_n_head_kv(model) * head_bytes + 12

    def _append_state(self, context, state: np.ndarray) -> bool:
        """Add the positions in ``state`` (a ``_suffix_state``) to the sequence in ``context``."""
        memory = self._api.llama_get_memory(context)
        try:
            if not self._put_state(context, state, sequence=_STAGING_SEQUENCE):
                return False
            self._api.llama_memory_seq_cp(memory, _STAGING_SEQUENCE, 0, -1, -1)
            return True
        finally:
            self._api.llama_memory_seq_rm(memory, _STAGING_SEQUENCE, -1, -1)

    def _length(self, context) -> int:
        return int(self._api.llama_memory_seq_pos_max(self._api.llama_get_memory(context), 0)) + 1

    def _state_of(self, context, *, sequence: int = 0) -> np.ndarray:
        size = self._api.llama_state_seq_get_size(context, sequence)
        state = np.empty(size, dtype=np.uint8)
        written = self._api.llama_state_seq_get_data(context, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                     size, sequence)
        return state[:written]

    def _put_state(self, context, state: np.ndarray, *, sequence: int = 0) -> bool:
        pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        return self._api.llama_state_seq_set_data(context, pointer, len(state), sequence) != 0

    def _decode(self, context, *, tokens: np.ndarray | None, embeddings: np.ndarray | None,
                logits_for_last: bool) -> None:
        api = self._api
        count = len(tokens) if tokens is not None else len(embeddings)
        start = self._length(context)
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
            status = api.llama_decode(context, batch)
        finally:
            api.llama_batch_free(batch)
        if logits_for_last:
            self._last_read = context
        if status == 2:
            raise DecodeAbortedError("reading was stopped")
        if status != 0:
            raise MiphaError(f"llama.cpp could not read the prompt (llama_decode returned {status}): "
                             "start a new chat, or restart with --runtime torch")


class TokenTable:
    """The input embedding of token ids as llama.cpp computes it: their rows of the GGUF's
    ``token_embd.weight``, dequantized to float32 (the file is memory-mapped; only rows asked for are read)."""

    def __init__(self, path: Path) -> None:
        import gguf

        tensor = next((tensor for tensor in gguf.GGUFReader(path).tensors if tensor.name == "token_embd.weight"),
                      None)
        if tensor is None:
            raise ModelLoadError(f"{path} has no token embedding table: delete the file to have it rebuilt")
        self._tensor = tensor

    def rows(self, token_ids: Sequence[int]) -> np.ndarray:
        import gguf

        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._tensor.data)):
            raise MiphaError("a token id is outside the model's vocabulary")
        return np.ascontiguousarray(gguf.quants.dequantize(self._tensor.data[ids], self._tensor.tensor_type),
                                    dtype=np.float32)


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
def _warn_of_openmp_once() -> None:
    """Say so where llama-cpp-python was built with OpenMP (a plain ``pip install`` builds it so).

    ggml then waits at each of its hundreds of barriers per token in libgomp, which PyTorch shares.
    Once two of our threads have run OpenMP work (a reply's and the draft reader's), libgomp counts
    more threads than cores and sleeps in every barrier instead of spinning: on a 2-core EPYC a
    reply's thread decoded 4.2-4.9 tok/s where the main thread decoded 5.2-6.1, and 6.5-7.0 on
    either without OpenMP. ``scripts/install-llama-cpp.sh`` builds it without."""
    import llama_cpp

    if b"OPENMP = 1" in llama_cpp.llama_print_system_info():
        logger.warning("llama-cpp-python was built with OpenMP, which decodes up to a fifth slower here: "
                       "run `make run` to rebuild it without (scripts/install-llama-cpp.sh)")


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
