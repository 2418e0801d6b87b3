"""Voken-aware decoding with iteration-level (continuous) batching.

Design (see docs/DESIGN_DECODER.md for the why):
- Requests wait in a queue; at every step boundary the engine admits as many as the KV budget and
  the per-step prefill budget allow. Each admitted request is prefilled alone (batch 1, exactly its
  single-request computation), then its KV cache is merged into the running batch, left-padded.
- One decode step runs all running rows together: a 2-D attention mask hides each row's padding,
  per-row position ids keep RoPE positions exact. Finished and aborted rows are dropped after the
  step and all-padding columns are trimmed, so their memory is freed at once.
- `[IMG0]` sampled ⇒ that row feeds `[IMG0]`…`[IMG7]` in the next step (the step is 8 wide; the
  other rows' 7 extra positions are masked out). Its 8 voken states are the final-norm states that
  predicted `[IMG0]`…`[IMG7]` (MINIGPT5.md §3): the state that sampled `[IMG0]`, then `[IMG0]`…`[IMG6]`.
- Sampling is per row on CPU with the row's own generator (sampling.py): a request's output does not
  depend on its batch company beyond float rounding in the batched matmuls.
"""
from __future__ import annotations

import collections
import inspect
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .config import NUM_VOKENS
from .sampling import SamplingParams, sample_tokens
from .tokenizer import StreamingDetokenizer

STOP_TEXT = "###"


class AdmissionError(ValueError):
    """A request that can never run (too long for the context or the KV budget)."""


@dataclass
class DecodeRequest:
    request_id: str
    prompt_embeds: torch.Tensor  # [T, H], image embeddings already spliced in
    params: SamplingParams
    prompt_tokens: int = 0  # text tokens of the prompt (BOS included)
    image_tokens: int = 0  # spliced image embedding positions

    @property
    def reserved_tokens(self) -> int:
        """KV positions this request may occupy: prompt + generation + a voken block's overshoot."""
        return self.prompt_embeds.shape[0] + self.params.max_tokens + NUM_VOKENS - 1


@dataclass
class TextDelta:
    request_id: str
    text: str


@dataclass
class VokenStates:
    request_id: str
    states: torch.Tensor  # [8, H] float32 on CPU
    text_offset: int  # characters of answer text before the image


@dataclass
class Finished:
    request_id: str
    reason: str  # "stop", "length", "aborted"
    completion_tokens: int
    vokens: int
    images: int
    text: str
    token_ids: list[int] = field(default_factory=list)  # sampled and forced, in order


@dataclass
class _Row:
    request: DecodeRequest
    detokenizer: StreamingDetokenizer
    generator: torch.Generator
    length: int  # valid KV positions of this row
    next_input: list[int] = field(default_factory=list)  # ids to feed in the next step
    generated: list[int] = field(default_factory=list)  # sampled and forced ids (repetition penalty)
    text: str = ""  # answer text released so far
    held: str = ""  # text held back: it could be the start of "###"
    voken_source_state: torch.Tensor | None = None  # the state that sampled [IMG0]
    images: int = 0
    finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


def _cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; accept both."""
    params = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DecodeEngine:
    """Continuous-batching decoder over a `LlamaForCausalLM`. Thread-safe `submit`/`abort`;
    `step` is called by one thread (the engine loop) and returns the events of that step."""

    def __init__(self, llm, tokenizer, *, voken_ids: list[int], eos_id: int, banned_ids: list[int],
                 kv_budget_tokens: int = 65536, max_rows: int = 32, max_prefill_tokens: int = 4096,
                 run_to_completion: bool = False):
        """`run_to_completion=True` is the classic static batching baseline for benchmarks: new
        requests are admitted only when the whole running batch has finished."""
        self.llm = llm.eval()
        self.run_to_completion = run_to_completion
        self.tokenizer = tokenizer
        self.voken_ids = list(voken_ids)
        self.eos_id = eos_id
        self.banned_ids = sorted(set(banned_ids) | set(voken_ids[1:]))
        self.max_positions = llm.config.max_position_embeddings
        self.kv_budget_tokens = kv_budget_tokens
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self._cache_kw = _cache_keyword(llm)
        self._lock = threading.Lock()
        self._waiting: collections.deque[DecodeRequest] = collections.deque()
        self._aborted: set[str] = set()
        self.rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 = valid KV position
        self._admitted_last_step = False

    # ---- called from any thread -------------------------------------------------------------
    def check_admissible(self, request: DecodeRequest) -> None:
        """Raise AdmissionError if the request can never run here."""
        needed = request.reserved_tokens
        if needed > self.max_positions:
            raise AdmissionError(
                f"prompt ({request.prompt_embeds.shape[0]} positions incl. images) + max_tokens "
                f"({request.params.max_tokens}) + {NUM_VOKENS - 1} exceeds the context of "
                f"{self.max_positions} positions")
        if needed > self.kv_budget_tokens:
            raise AdmissionError(f"request needs {needed} KV positions, more than the KV-cache budget "
                                 f"of {self.kv_budget_tokens} (kv_cache_budget_tokens)")

    def submit(self, request: DecodeRequest) -> None:
        self.check_admissible(request)
        with self._lock:
            self._waiting.append(request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self.rows or self._waiting)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # ---- the engine loop ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list:
        """Admit and prefill waiting requests, run one decode step, drop finished rows."""
        events: list = []
        self._apply_aborts(events)
        # A newcomer's first token goes out at once; the running rows decode on the next call, and
        # admission steps never follow each other, so a stream of arrivals cannot starve them.
        admitted = 0 if self._admitted_last_step else self._admit(events)
        self._admitted_last_step = admitted > 0
        if not admitted and any(row.finish_reason is None for row in self.rows):
            self._decode_step(events)
        self._evict_finished(events)
        return events

    def _apply_aborts(self, events: list) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            kept = collections.deque(r for r in self._waiting if r.request_id not in aborted)
            for request in self._waiting:
                if request.request_id in aborted:
                    events.append(Finished(request.request_id, "aborted", 0, 0, 0, ""))
            self._waiting = kept
        for row in self.rows:
            if row.request_id in aborted and row.finish_reason is None:
                row.finish_reason, row.next_input = "aborted", []

    def _admit(self, events: list) -> int:
        """Prefill waiting requests that fit; returns how many were admitted."""
        admitted = prefill_tokens = 0
        if self.run_to_completion and self.rows:
            return 0
        while True:
            with self._lock:
                if not self._waiting or len(self.rows) >= self.max_rows:
                    return admitted
                request = self._waiting[0]
                reserved = sum(row.request.reserved_tokens for row in self.rows)
                length = request.prompt_embeds.shape[0]
                if reserved + request.reserved_tokens > self.kv_budget_tokens:
                    return admitted  # waits for running rows to finish (FIFO: no overtaking)
                if prefill_tokens and prefill_tokens + length > self.max_prefill_tokens:
                    return admitted  # bound the stall of running rows by prefill work
                self._waiting.popleft()
            prefill_tokens += length
            admitted += 1
            self._prefill(request, events)

    def _prefill(self, request: DecodeRequest, events: list) -> None:
        embeds = request.prompt_embeds.to(self.llm.device, self.llm.dtype)[None]
        cache = DynamicCache()
        out = self.llm.model(inputs_embeds=embeds, use_cache=True, **{self._cache_kw: cache})
        hidden = out.last_hidden_state[0, -1]
        row = _Row(request, StreamingDetokenizer(self.tokenizer), request.params.generator(),
                   length=embeds.shape[1])
        self._merge(row, cache)
        self._sample_and_advance([row], hidden[None], events)

    def _merge(self, row: _Row, cache: DynamicCache) -> None:
        """Append a prefilled batch-1 cache to the running batch, left-padding the shorter side."""
        new_mask = torch.ones(1, row.length, dtype=torch.long, device=self.llm.device)
        if self._cache is None:
            self._cache, self._mask, self.rows = cache, new_mask, [row]
            return
        old_len, new_len = self._mask.shape[1], row.length
        merged = []
        for old, new in zip(self._cache.layers, cache.layers):
            ok, ov = _left_pad(old.keys, new_len), _left_pad(old.values, new_len)
            nk, nv = _left_pad(new.keys, old_len), _left_pad(new.values, old_len)
            merged.append((torch.cat([ok, nk]), torch.cat([ov, nv])))
        self._cache = DynamicCache(merged)
        self._mask = torch.cat([_left_pad(self._mask, new_len, dim=1), _left_pad(new_mask, old_len, dim=1)])
        self.rows.append(row)

    def _decode_step(self, events: list) -> None:
        width = max(len(row.next_input) for row in self.rows)
        batch = len(self.rows)
        device = self.llm.device
        ids = torch.full((batch, width), self.eos_id, dtype=torch.long)
        new_mask = torch.zeros(batch, width, dtype=torch.long)
        for i, row in enumerate(self.rows):
            n = len(row.next_input)
            ids[i, :n] = torch.tensor(row.next_input)
            new_mask[i, :n] = 1
        positions = torch.tensor([row.length for row in self.rows])[:, None] + torch.arange(width)[None]
        self._mask = torch.cat([self._mask, new_mask.to(device)], dim=1)
        embeds = self.llm.get_input_embeddings()(ids.to(device))
        out = self.llm.model(inputs_embeds=embeds, attention_mask=self._mask, position_ids=positions.to(device),
                             use_cache=True, **{self._cache_kw: self._cache})
        hidden = out.last_hidden_state
        advanced, states = [], []
        for i, row in enumerate(self.rows):
            n = len(row.next_input)
            if row.finish_reason is not None or n == 0:
                continue
            row.length += n
            if n == NUM_VOKENS:
                self._emit_vokens(row, hidden[i, :n], events)
            advanced.append(row)
            states.append(hidden[i, n - 1])
        self._sample_and_advance(advanced, torch.stack(states), events)

    def _emit_vokens(self, row: _Row, block_states: torch.Tensor, events: list) -> None:
        states = torch.cat([row.voken_source_state[None], block_states[:NUM_VOKENS - 1]]).float().cpu()
        row.voken_source_state = None
        row.images += 1
        row.generated += self.voken_ids[1:]
        events.append(VokenStates(row.request_id, states, len(row.text)))

    def _sample_and_advance(self, rows: list[_Row], states: torch.Tensor, events: list) -> None:
        """Sample every row's next token from its final-norm state (one lm_head, one batched
        sampler) and handle what each token means."""
        live = []
        for index, row in enumerate(rows):
            row.next_input = []
            if len(row.generated) >= row.request.params.max_tokens:
                self._finish(row, "length", events)  # e.g. right after a voken block
            else:
                live.append(index)
        if not live:
            return
        rows = [rows[i] for i in live]
        states = states[live]
        logits = self.llm.lm_head(states).float().cpu()
        logits[:, self.banned_ids] = float("-inf")
        for i, row in enumerate(rows):
            if row.images >= row.request.params.max_images:
                logits[i, self.voken_ids[0]] = float("-inf")
        tokens = sample_tokens(logits, [r.request.params for r in rows], [r.generated for r in rows],
                               [r.generator for r in rows])
        for row, token, state in zip(rows, tokens, states):
            self._advance(row, self._force_image(row, token), state, events)

    def _force_image(self, row: _Row, token: int) -> int:
        """force_image (upstream force_generation): the turn may not end before its image, and the
        image is forced at the last position where its 8 vokens still fit."""
        params = row.request.params
        if not params.force_image or row.images > 0:
            return token
        if params.max_tokens - len(row.generated) <= NUM_VOKENS:
            return self.voken_ids[0]
        if token == self.eos_id or STOP_TEXT in row.held + row.detokenizer.peek(token):
            return self.voken_ids[0]
        return token

    def _advance(self, row: _Row, token: int, state: torch.Tensor, events: list) -> None:
        row.generated.append(token)
        if token == self.voken_ids[0]:
            self._flush_text(row, events)
            row.voken_source_state = state.clone()
            row.next_input = list(self.voken_ids)
            return
        if token == self.eos_id:
            return self._finish(row, "stop", events)
        if self._push_text(row, token, events):
            return self._finish(row, "stop", events)
        if len(row.generated) >= row.request.params.max_tokens:
            return self._finish(row, "length", events)
        row.next_input = [token]

    def _push_text(self, row: _Row, token: int, events: list) -> bool:
        """Detokenise; release text except a possible '###' prefix. True when '###' was reached."""
        pending = row.held + row.detokenizer.push(token)
        stop_at = pending.find(STOP_TEXT)
        if stop_at >= 0:
            row.held = ""
            self._release(row, pending[:stop_at], events)
            return True
        keep = next((k for k in (2, 1) if pending.endswith(STOP_TEXT[:k])), 0)
        row.held = pending[len(pending) - keep:] if keep else ""
        self._release(row, pending[:len(pending) - keep], events)
        return False

    def _flush_text(self, row: _Row, events: list) -> None:
        held, row.held = row.held, ""
        self._release(row, held, events)

    def _release(self, row: _Row, text: str, events: list) -> None:
        if text:
            row.text += text
            events.append(TextDelta(row.request_id, text))

    def _finish(self, row: _Row, reason: str, events: list) -> None:
        if reason != "stop":
            self._flush_text(row, events)
        row.finish_reason = reason
        row.next_input = []

    def _evict_finished(self, events: list) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        for row in self.rows:
            if row.finish_reason is not None:
                vokens = row.images * NUM_VOKENS
                events.append(Finished(row.request_id, row.finish_reason, len(row.generated), vokens,
                                       row.images, row.text, row.generated))
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # leading all-padding columns go too
        self._mask = mask[:, first:]
        self._cache = DynamicCache([(layer.keys.index_select(0, index)[:, :, first:],
                                     layer.values.index_select(0, index)[:, :, first:])
                                    for layer in self._cache.layers])
        self.rows = [self.rows[i] for i in keep]

    def drop_running(self) -> list[str]:
        """Forget every running row (after a failed step); returns their request ids."""
        dropped = [row.request_id for row in self.rows]
        self.rows, self._cache, self._mask = [], None, None
        return dropped

    @property
    def kv_positions_in_use(self) -> int:
        """Allocated KV positions (rows × padded length): what the budget really costs now."""
        return 0 if self._mask is None else int(self._mask.numel())


def _left_pad(tensor: torch.Tensor, target: int, dim: int = 2) -> torch.Tensor:
    missing = target - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
