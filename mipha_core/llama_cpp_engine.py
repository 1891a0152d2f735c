"""``LlamaCppEngine``: Mipha with its language model on llama.cpp and its vision tower in PyTorch.

On a CPU, llama.cpp's quantized matrix kernels read Phi-2's weights at the memory bandwidth,
which PyTorch's do not (see the README's performance table). The photo goes through the same
SigLIP tower and projector as on the PyTorch path, and its 729 projected features are handed to
llama.cpp as input embeddings at the image's positions; the prompt's text goes in as the same
token ids the PyTorch path would read. The conversation rules, the prompt and the sampler are
shared, so only the language model's arithmetic differs.

The context keeps the KV state of the conversation it served last. When another conversation
needs it, that state is copied out into a byte-bounded LRU and the other one's copied back in,
so a follow-up question reads only its own tokens, like ``PrefixKVCache`` on the PyTorch path.

While a question is typed, ``prefetch`` reads ahead what its reply will read first: a dropped
photo's features and positions, then the finished words. Send then reads only the rest. Replies
always come first: a reply waiting for the context stops a draft of another conversation at
once (what it read is kept), and waits for one of its own conversation, whose work it needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mipha_core.caching import ByteBoundedLRU, CacheKey, realign_replies, shared_prefix_length
from mipha_core.conversation import Turn
from mipha_core.engine import CacheSettings
from mipha_core.errors import ContextOverflowError, InvalidMessagesError, MiphaError
from mipha_core.fitting import MIN_REPLY_TOKENS, FittedEngine, PreparedPrompt, PromptFitter
from mipha_core.generation import CountingTextStreamer, GenerationParams, TokenSampler
from mipha_core.llama_cpp_runtime import DecodeAbortedError, LlamaCppContext
from mipha_core.photos import PhotoFeatures, photo_key
from mipha_core.preprocessing import ImagePreprocessor
from mipha_core.prompt import PhiPromptStyle
from mipha_core.streaming import ReplyStream
from mipha_core.vision import VisionCancelledError, VisionEncoder

logger = logging.getLogger(__name__)

_ABORT_POLL_SECONDS = 0.05


@dataclass
class _Sequence:
    """What a context holds (or held, once saved): whose conversation, which ids, which photo behind the image ids."""

    key: CacheKey | None = None
    token_ids: list[int] = field(default_factory=list)
    """The ids read, and the reply's last token too (which was sampled but never read)."""
    image_key: str | None = None

    def read_ids(self, length: int) -> list[int]:
        return self.token_ids[:length]


@dataclass(frozen=True)
class _Draft:
    """A question being typed: whose, and the prompt its reply will certainly start with."""

    key: CacheKey
    prepared: PreparedPrompt
    image_key: str | None
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class _Saved:
    sequence: _Sequence
    state: np.ndarray


class LlamaCppEngine(FittedEngine):
    """A Mipha model whose language model runs on llama.cpp (one reply at a time) and vision tower in PyTorch."""

    def __init__(
        self,
        *,
        context: LlamaCppContext,
        vision: VisionEncoder,
        tokenizer: PreTrainedTokenizerBase,
        preprocessor: ImagePreprocessor,
        model_id: str,
        precision_label: str,
        context_length: int,
        image_tokens: int,
        image_token_id: int,
        caches: CacheSettings = CacheSettings(),
    ) -> None:
        self.context = context
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.precision_label = precision_label
        self.end_token_id = tokenizer.convert_tokens_to_ids(PhiPromptStyle.stop_text)
        self.image_token_id = image_token_id
        self.fitter = PromptFitter(tokenizer, context_length=context_length, image_tokens=image_tokens,
                                   image_token_id=image_token_id)
        self.suppressed_ids = list(range(len(tokenizer), context.vocab_size))
        self.vision = vision
        self.photo_features = PhotoFeatures(
            preprocessor=preprocessor,
            encode=vision,
            max_bytes=caches.image_feature_bytes,
        )
        self._saved: ByteBoundedLRU[_Saved] = ByteBoundedLRU(caches.kv_cache_bytes)
        self.shared_opening_ids = _template_opening(self.fitter)
        """What every prompt with Mipha's own system sentence starts with (that sentence and "USER:").
        It is public text, so the context keeps its KV state for whoever comes next: read once here."""
        self._held = _Sequence()
        self.context.read_tokens(self.shared_opening_ids, logits_for_last=False)
        self._held.token_ids = list(self.shared_opening_ids)
        self._lock = threading.Lock()
        self._forgotten: set[CacheKey] = set()
        self._forgotten_lock = threading.Lock()
        self._next_turn_ids = tokenizer(f"{PhiPromptStyle.user_role}:", add_special_tokens=False).input_ids
        self._drafts = threading.Condition()
        self._draft: _Draft | None = None
        """The newest draft not read yet; an older one is replaced, never queued."""
        self._reading_draft: _Draft | None = None
        self._replies_waiting = 0
        self._closed = False
        self._draft_reader: threading.Thread | None = None

    @property
    def label(self) -> str:
        """What runs, for a person: e.g. "zhumj34/Mipha-3B · int8 · CPU (llama.cpp)"."""
        return f"{self.model_id} · {self.precision_label}"

    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float = 1.0,
        cancel: threading.Event | None = None,
        cache: CacheKey | None = None,
        min_new_tokens: int = MIN_REPLY_TOKENS,
        seed: int | None = None,
    ) -> ReplyStream:
        """Start a reply to the last user message; the same contract as ``Engine.stream``.

        ``reused_tokens`` is the estimate at this moment; the reply corrects it once it holds the
        context (another conversation's reply may have run in between).
        """
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        prepared = self.prepare(messages, max_new_tokens=params.max_new_tokens, min_new_tokens=min_new_tokens)
        params = replace(params, max_new_tokens=prepared.max_new_tokens)
        cancel = cancel or threading.Event()
        image_key = photo_key(prepared.image) if prepared.image is not None else None

        def run(streamer: CountingTextStreamer) -> torch.Tensor:
            with self._held_for(cache, cancel) as held:
                if held is None:
                    streamer.end()
                    return torch.tensor([prepared.token_ids])
                sequence = self._reply(prepared, params, held=held, cache=cache, image_key=image_key, seed=seed,
                                       cancel=cancel, streamer=streamer, reply=reply)
                kept = tuple(held.token_ids)
            if cache is not None and sequence.shape[1] > prepared.prompt_tokens:
                threading.Thread(target=self._read_ahead, args=(cache, kept), name="mipha-read-ahead",
                                 daemon=True).start()
            return sequence

        reply = ReplyStream(
            run=run,
            streamer=CountingTextStreamer(self.tokenizer),
            cancel=cancel,
            prompt_tokens=prepared.prompt_tokens,
            dropped_turns=prepared.dropped_turns,
            reused_tokens=self._expected_reuse(cache, prepared.token_ids, image_key),
            max_new_tokens=params.max_new_tokens,
            end_token_id=self.end_token_id,
        )
        return reply

    def prefetch(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int, cache: CacheKey) -> None:
        """Read ahead, in the background, what the reply to a question still being typed reads first
        (see the module); returns at once. A draft that cannot be fitted is not read ahead: Send
        will say why."""
        try:
            prepared = self.fitter.prepare_draft(messages, max_new_tokens=max_new_tokens)
        except (ContextOverflowError, InvalidMessagesError):
            return
        draft = _Draft(key=cache, prepared=prepared,
                       image_key=photo_key(prepared.image) if prepared.image is not None else None)
        with self._drafts:
            if self._closed:
                return
            self._draft = draft
            if self._draft_reader is None:
                self._draft_reader = threading.Thread(target=self._read_drafts, name="mipha-draft-reader",
                                                      daemon=True)
                self._draft_reader.start()
            self._drafts.notify()

    def forget(self, cache: CacheKey) -> None:
        """Free the KV state kept for a conversation, e.g. when it is deleted; without waiting for a
        reply in progress (the context is then cleared when that reply ends)."""
        self._saved.pop(cache)
        with self._forgotten_lock:
            self._forgotten.add(cache)
        if self._lock.acquire(blocking=False):
            try:
                self._drop_forgotten()
            finally:
                self._lock.release()

    def _drop_forgotten(self) -> None:
        """With the lock held: clear the context if its conversation was forgotten meanwhile."""
        with self._forgotten_lock:
            forgotten, self._forgotten = self._forgotten, set()
        if self._held.key in forgotten:
            self._start_over(None)

    def close(self) -> None:
        with self._drafts:
            self._closed = True
            self._draft = None
            self._drafts.notify()
        if (reading := self._reading_draft) is not None:
            reading.stop.set()
        with self._lock:
            self.context.close()

    def _reply(self, prepared: PreparedPrompt, params: GenerationParams, *, held: _Sequence, cache: CacheKey | None,
               image_key: str | None, seed: int | None, cancel: threading.Event, streamer: CountingTextStreamer,
               reply: ReplyStream) -> torch.Tensor:
        ids, keep = self._aligned(held, prepared.token_ids, image_key)
        self.context.truncate(keep)
        held.token_ids, held.image_key = held.token_ids[:keep], image_key if keep else None
        reply.reused_tokens = keep
        generated: list[int] = []
        streamer.put(torch.tensor([ids]))  # the prompt, which the streamer skips
        try:
            with self._aborting_on(cancel):
                self._read_prompt(ids, keep, prepared, owner=cache.owner if cache else None, streamer=streamer,
                                  cancel=cancel)
                held.image_key = image_key
                sampler = TokenSampler(params, suppressed_ids=self.suppressed_ids, seed=seed)
                while True:
                    token = sampler(self.context.last_logits())
                    generated.append(token)
                    streamer.put(torch.tensor([token]))
                    if token == self.end_token_id or len(generated) >= params.max_new_tokens or cancel.is_set():
                        break
                    self.context.read_tokens([token], logits_for_last=True)
        except (DecodeAbortedError, VisionCancelledError):
            logger.debug("reply stopped while the prompt was being read")
        finally:
            read = self.context.length
            held.token_ids = ids + generated if read >= len(ids) else ids[:read]
            if cache is None:
                self._start_over(None)
            streamer.end()
        return torch.tensor([ids + generated])

    def _aligned(self, held: _Sequence, token_ids: list[int], image_key: str | None) -> tuple[list[int], int]:
        """The prompt to read (earlier replies given back the ids they were generated as) and how
        many of its first positions the context already holds."""
        ids = token_ids
        if held.token_ids:
            ids = realign_replies(held.token_ids, ids, end_token_id=self.end_token_id, decode=self.tokenizer.decode,
                                  image_token_id=self.image_token_id)
        keep = shared_prefix_length(held.read_ids(self.context.length), held.image_key, ids, image_key,
                                    image_token_id=self.image_token_id)
        return ids, keep

    def _read_drafts(self) -> None:
        """The draft reader's thread: the newest draft, whenever no reply needs the context."""
        while True:
            with self._drafts:
                while self._draft is None and not self._closed:
                    self._drafts.wait()
                if self._closed:
                    return
            if not self._lock_for_draft():
                continue
            try:
                with self._drafts:
                    draft, self._draft = self._draft, None
                if draft is not None and not self._closed:
                    self._drop_forgotten()
                    self._read_draft(draft)
            except Exception:  # this thread must outlive one bad draft; its reply reads the prompt itself
                logger.warning("reading a draft ahead failed; its reply will read it", exc_info=True)
            finally:
                self._drop_forgotten()
                self._lock.release()

    def _lock_for_draft(self) -> bool:
        """Take the context's lock once no reply waits for it; False if the engine closed meanwhile."""
        while not self._closed:
            if self._replies_waiting == 0 and self._lock.acquire(timeout=_ABORT_POLL_SECONDS):
                if self._replies_waiting == 0:
                    return True
                self._lock.release()
            time.sleep(_ABORT_POLL_SECONDS)
        return False

    def _read_draft(self, draft: _Draft) -> None:
        """With the lock held: make the context hold the draft's prompt, reading only what it lacks.

        A draft the context already holds more of (the person deleted a word) cuts nothing, so
        typing the word again costs nothing either."""
        held = self._switch_to(draft.key)
        ids, keep = self._aligned(held, draft.prepared.token_ids, draft.image_key)
        if keep >= len(ids) - 1 and held.read_ids(self.context.length)[:len(ids)] == ids:
            return  # all held: a prompt's last position is left to read for its logits, a draft's need not be
        self.context.truncate(keep)
        held.token_ids = held.token_ids[:keep]
        self._reading_draft = draft
        try:
            with self._aborting_on(draft.stop):
                self._read_prompt(ids, keep, draft.prepared, owner=draft.key.owner, streamer=None, cancel=draft.stop)
        except (DecodeAbortedError, VisionCancelledError):
            logger.debug("a reply came first: stopped reading a draft ahead")
        finally:
            self._reading_draft = None
            held.token_ids = ids[:self.context.length]
            held.image_key = draft.image_key if self.image_token_id in held.token_ids else None

    def _read_ahead(self, cache: CacheKey, token_ids: tuple[int, ...]) -> None:
        """While the person reads the reply, read what every next question starts with: the reply's
        last token and end token (never read, since generation stopped there) and "USER:". The
        follow-up then reads only its own words. Skipped when a reply is running or the
        conversation moved on; a next prompt that differs is only cut off there."""
        if not self._lock.acquire(timeout=_ABORT_POLL_SECONDS):
            return
        try:
            held = self._held
            if held.key != cache or tuple(held.token_ids) != token_ids or self.context.length != len(token_ids) - 1:
                return
            end = [] if token_ids[-1] == self.end_token_id else [self.end_token_id]
            self.context.resume()
            self.context.read_tokens([token_ids[-1], *end, *self._next_turn_ids], logits_for_last=False)
            held.token_ids = [*token_ids, *end, *self._next_turn_ids]
        except MiphaError:
            logger.debug("reading ahead failed; the next question reads these tokens itself", exc_info=True)
        finally:
            self._drop_forgotten()
            self._lock.release()

    def _read_prompt(self, ids: list[int], start: int, prepared: PreparedPrompt, *, owner: str | None,
                     streamer: CountingTextStreamer | None, cancel: threading.Event) -> None:
        """Read ``ids[start:]``: text as token ids, the image's positions as its projected features,
        photo and the text around it in one batch."""
        first = ids.index(self.image_token_id) if prepared.image is not None and self.image_token_id in ids else None
        end = first + self.image_tokens if first is not None else 0
        if first is None or start >= end:
            self.context.read_tokens(ids[start:], logits_for_last=True)
            return
        with self.vision.stoppable(cancel):
            features, seconds = self.photo_features.get(prepared.image, owner=owner)
        if streamer is not None:
            streamer.vision_seconds = seconds
        self.context.read([ids[start:first], features[max(start - first, 0):], ids[end:]], logits_for_last=True)

    def _expected_reuse(self, cache: CacheKey | None, token_ids: list[int], image_key: str | None) -> int:
        if cache is None:
            return 0
        held = self._held if self._held.key == cache else None
        if held is None:
            saved = self._saved.get(cache)
            held = saved.sequence if saved else None
        if held is None:
            return 0
        return shared_prefix_length(held.token_ids, held.image_key, token_ids, image_key,
                                    image_token_id=self.image_token_id)

    @contextmanager
    def _held_for(self, cache: CacheKey | None, cancel: threading.Event) -> Iterator[_Sequence | None]:
        """The context, holding ``cache``'s conversation where it was kept; None when cancelled while waiting."""
        with self._drafts:
            self._replies_waiting += 1
        try:
            while not self._lock.acquire(timeout=_ABORT_POLL_SECONDS):
                if (reading := self._reading_draft) is not None and not _draft_of(reading, cache):
                    reading.stop.set()
                if cancel.is_set():
                    yield None
                    return
        finally:
            with self._drafts:
                self._replies_waiting -= 1
        try:
            self._drop_forgotten()
            yield self._switch_to(cache)
        finally:
            self._drop_forgotten()
            self._lock.release()

    def _switch_to(self, key: CacheKey | None) -> _Sequence:
        """Make the context hold ``key``'s conversation: save the one it holds, restore ``key``'s if kept."""
        held = self._held
        if key is not None and held.key == key:
            return held
        if key is not None and held.key == key.new_chat() and self._saved.get(key) is None:
            held.key = key  # a new chat's first question, read while typed: its conversation takes it over
            return held
        if held.key is not None and held.token_ids:
            state = self.context.snapshot()
            self._saved.put(held.key, _Saved(sequence=held, state=state), len(state))
        saved = (self._saved.pop(key) or self._saved.pop(key.new_chat())) if key is not None else None
        if saved is not None and self.context.restore(saved.state):
            self._held = replace(saved.sequence, token_ids=list(saved.sequence.token_ids))
            return self._held
        return self._start_over(key)

    def _start_over(self, key: CacheKey | None) -> _Sequence:
        """With the lock held: a sequence for ``key`` holding only ``shared_opening_ids``, kept where
        the context holds them (nothing else of what it held stays)."""
        opening = self.shared_opening_ids
        keep = len(opening) if self._held.read_ids(self.context.length)[:len(opening)] == opening else 0
        self.context.truncate(keep)
        self._held = _Sequence(key=key, token_ids=list(opening[:keep]))
        return self._held

    @contextmanager
    def _aborting_on(self, cancel: threading.Event) -> Iterator[None]:
        """While inside, setting ``cancel`` stops llama.cpp mid-computation, within one graph node."""
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if cancel.wait(_ABORT_POLL_SECONDS):
                    self.context.abort()
                    return

        self.context.resume()
        watcher = threading.Thread(target=watch, name="mipha-llama-abort", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            self.context.resume()


def _draft_of(draft: _Draft, cache: CacheKey | None) -> bool:
    """Whether a reply for ``cache`` needs what ``draft`` reads: its conversation's, or the new chat's it was sent from."""
    return cache is not None and draft.key in (cache, cache.new_chat())


def _template_opening(fitter: PromptFitter) -> list[int]:
    """The ids a prompt with Mipha's own system sentence starts with, whether a photo follows or not."""
    prompts = [fitter.token_ids([Turn(question)], image_turn=image_turn)
               for question in ("Hi", "What? 1") for image_turn in (None, 0)]
    same = next((i for i, ids in enumerate(zip(*prompts, strict=False)) if len(set(ids)) > 1),
                min(map(len, prompts)))
    return prompts[0][:same]
