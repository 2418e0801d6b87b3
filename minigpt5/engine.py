"""Voken-aware decoding with iteration-level (continuous) batching.

Design (see docs/DESIGN_DECODER.md for the why):
- Requests wait in a queue; at every step boundary the engine admits as many as the KV budget and
  the per-step prefill budget allow. Each admitted request is prefilled alone (batch 1, exactly its
  single-request computation) straight into its own KV slot, and its first token is sampled and
  sent in that same step.
- KV slots (`_KVSlots`): per layer one over-allocated [rows, heads, positions, d] tensor; row i owns
  slot i, positions 0..length-1. A step writes each row's new keys/values at its own positions in
  place: nothing is re-concatenated or left-padded. The layer loop (`_forward`) uses the model's own
  norms, projections, rotary embedding and MLP; only the attention's KV path is ours.
- One decode step runs all running rows together; a per-row position mask hides what lies beyond
  each row's length. Finished and aborted rows are compacted out of the slots after the step.
- `[IMG0]` sampled ⇒ that row feeds `[IMG0]`…`[IMG7]` in the next step (the step is 8 wide; the
  other rows' 7 extra positions are masked out). Its 8 voken states are the final-norm states that
  predicted `[IMG0]`…`[IMG7]`: the state that sampled `[IMG0]`, then `[IMG0]`…`[IMG6]` (upstream
  eric-ai-lab/MiniGPT-5 model.py:317-321). Each voken block is one image, up to `max_images`.
- `max_tokens` counts sampled ids, `[IMG0]` included; the 7 forced vokens of a block do not count
  (upstream's max_new_tokens: its `input_ids` hold the sampled ids only, mini_gpt5.py:321-338).
- Sampling is per row, batched on the model's device, with the row's own generator (sampling.py): a
  request's output does not depend on its batch company beyond float rounding in the batched matmuls.
- Prefix cache (prefix_cache.py, optional): at admission the longest cached chain of the prompt's
  blocks is copied into the row's slot and only the rest is prefilled; the prompt blocks computed go
  into the cache, which lives in the part of the KV budget the running rows do not reserve.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import NUM_VOKENS
from .decode_graphs import StaticDecodeStep
from .prefix_cache import CachedBlock, PrefixCache, weights_fingerprint
from .sampling import SamplingParams, sample_tokens
from .tokenizer import StreamingDetokenizer

STOP_TEXT = "###"

log = logging.getLogger(__name__)


class AdmissionError(ValueError):
    """A request that can never run (too long for the context or the KV budget)."""


@dataclass
class DecodeRequest:
    request_id: str
    prompt_embeds: torch.Tensor  # [T, H], image embeddings already spliced in
    params: SamplingParams
    prompt_tokens: int = 0  # text tokens of the prompt (BOS included)
    image_tokens: int = 0  # spliced image embedding positions
    content: list | None = None  # one item per prompt position (prefix_cache.position_content); None: never cached
    block_hashes: list[bytes] = field(default_factory=list)  # set by the engine at submit when it caches

    @property
    def reserved_tokens(self) -> int:
        """KV positions this request may occupy: prompt + sampled ids + the 7 forced vokens of each image."""
        return self.prompt_embeds.shape[0] + self.params.max_tokens + (NUM_VOKENS - 1) * self.params.max_images


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
    sampled_tokens: int = 0  # ids the model sampled (what max_tokens counts): completion_tokens - 7 per image
    cached_positions: int = 0  # prompt positions taken from the prefix cache instead of prefilled


@dataclass
class _Row:
    request: DecodeRequest
    detokenizer: StreamingDetokenizer
    generator: torch.Generator
    length: int  # valid KV positions of this row
    seen: torch.Tensor  # [V] bool: the ids in `generated` (repetition penalty)
    next_input: list[int] = field(default_factory=list)  # ids to feed in the next step
    generated: list[int] = field(default_factory=list)  # sampled and forced ids
    sampled: int = 0  # sampled ids among them ([IMG0] included): what max_tokens bounds
    text: str = ""  # answer text released so far
    held: str = ""  # text held back: it could be the start of "###"
    voken_source_state: torch.Tensor | None = None  # the state that sampled [IMG0]
    images: int = 0
    finish_reason: str | None = None
    cached_positions: int = 0  # prompt positions copied from the prefix cache

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def record(self, ids: list[int]) -> None:
        self.generated += ids
        self.seen[ids] = True


class DecodeEngine:
    """Continuous-batching decoder over a `LlamaForCausalLM`. Thread-safe `submit`/`abort`;
    `step` is called by one thread (the engine loop) and returns the events of that step."""

    def __init__(
        self,
        llm,
        tokenizer,
        *,
        voken_ids: list[int],
        eos_id: int,
        banned_ids: list[int],
        kv_budget_tokens: int = 65536,
        max_rows: int = 32,
        max_prefill_tokens: int = 4096,
        run_to_completion: bool = False,
        preallocate_kv: bool = False,
        static_decode: bool = False,
        capture_fallback: bool = False,
        prefix_cache: PrefixCache | None = None,
    ):
        """`run_to_completion=True` is the classic static batching baseline for benchmarks: new
        requests are admitted only when the whole running batch has finished. `preallocate_kv`
        allocates the KV pool at its largest (max_rows × context) now instead of growing it on
        demand: on a GPU a server that cannot hold it fails at start, not under load.
        `static_decode` runs 1-token steps at bucketed static shapes (decode_graphs.py), captured as
        CUDA graphs on a GPU (here, at start); it implies `preallocate_kv`. `capture_fallback`: when
        the capture fails, log why (`capture_error`) and decode eagerly instead of failing.
        `prefix_cache`: reuse the KV of prompt prefixes across requests (prefix_cache.py); its chains
        start from this LLM's weights fingerprint, so a cache handed to another model never matches."""
        self.llm = llm.eval()
        self._device, self._dtype = llm.device, llm.dtype
        self._vocab_size = llm.lm_head.out_features
        self.run_to_completion = run_to_completion
        self.tokenizer = tokenizer
        self.voken_ids = list(voken_ids)
        self.eos_id = eos_id
        self.banned_ids = sorted(set(banned_ids) | set(voken_ids[1:]))
        self.max_positions = llm.config.max_position_embeddings
        self.kv_budget_tokens = kv_budget_tokens
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self._kv = _KVSlots(llm, max_rows)
        self.prefix_cache = prefix_cache
        self.model_key = weights_fingerprint(llm) if prefix_cache is not None else ""
        self.prefill_positions_computed = 0  # prompt positions prefilled, since the start
        self.prefill_positions_reused = 0  # prompt positions copied from the prefix cache instead
        if preallocate_kv or static_decode:
            self._kv.reserve(max_rows, self.max_positions)
        self._static: StaticDecodeStep | None = None
        self.capture_error: str | None = None
        if static_decode:
            self._static = StaticDecodeStep(
                self._decode_forward,
                max_rows=max_rows,
                max_positions=self.max_positions,
                pad_id=eos_id,
                device=self._device,
                capture=self._device.type == "cuda",
            )
            if self._static.capture:
                static_decode = self._capture(capture_fallback)
        self.static_decode = static_decode  # benchmarks switch it off to time the eager step in one run
        self._lock = threading.Lock()
        self._waiting: collections.deque[DecodeRequest] = collections.deque()
        self._aborted: set[str] = set()
        self.rows: list[_Row] = []  # row i owns KV slot i
        self._admitted_last_step = False
        self.step_prefill_seconds: list[float] = []  # each admission's prefill + first token in the last step

    def _capture(self, fallback: bool) -> bool:
        assert self._static is not None
        try:
            self._static.capture_all()
            return True
        except RuntimeError as exc:
            if not fallback:
                raise
            self._static, self.capture_error = None, f"{type(exc).__name__}: {exc}"
            log.warning("decode CUDA graphs could not be captured, decoding eagerly: %s", self.capture_error)
            return False

    # ---- called from any thread -------------------------------------------------------------
    def check_admissible(self, request: DecodeRequest) -> None:
        """Raise AdmissionError if the request can never run here."""
        needed = request.reserved_tokens
        if needed > self.max_positions:
            raise AdmissionError(
                f"prompt ({request.prompt_embeds.shape[0]} positions incl. images) + max_tokens "
                f"({request.params.max_tokens}) + {NUM_VOKENS - 1} per image (max_images="
                f"{request.params.max_images}) exceeds the context of {self.max_positions} positions"
            )
        if needed > self.kv_budget_tokens:
            raise AdmissionError(
                f"request needs {needed} KV positions, more than the KV-cache budget "
                f"of {self.kv_budget_tokens} (kv_cache_budget_tokens)"
            )

    def submit(self, request: DecodeRequest) -> None:
        self.check_admissible(request)
        if self.prefix_cache is not None and request.content is not None:
            request.block_hashes = self.prefix_cache.chain(self.model_key, request.content)  # off the engine thread
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

    @property
    def reserved_positions(self) -> int:
        """KV positions the running rows may occupy: what admission holds against `kv_budget_tokens`."""
        return sum(row.request.reserved_tokens for row in self.rows)

    # ---- the engine loop ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list:
        """Admit and prefill waiting requests, run one decode step, drop finished rows."""
        events: list = []
        self.step_prefill_seconds = []
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
                reserved = self.reserved_positions + request.reserved_tokens
                if reserved > self.kv_budget_tokens:
                    return admitted  # waits for running rows to finish (FIFO: no overtaking)
                cached = self._cached_prefix(request)
                computed = request.prompt_embeds.shape[0] - len(cached) * self._block_positions
                if prefill_tokens and prefill_tokens + computed > self.max_prefill_tokens:
                    return admitted  # bound the stall of running rows by prefill work
                self._waiting.popleft()
            prefill_tokens += computed
            admitted += 1
            started = time.perf_counter()
            self._prefill(request, cached, events)  # ends with the first token on the CPU: no pending kernels
            self.step_prefill_seconds.append(time.perf_counter() - started)
            if self.prefix_cache is not None:  # cached blocks live in the budget the running rows leave free
                self._cache_prompt(request, len(cached), room=self.kv_budget_tokens - reserved)

    @property
    def _block_positions(self) -> int:
        return self.prefix_cache.block_positions if self.prefix_cache is not None else 0

    def _cached_prefix(self, request: DecodeRequest) -> list[CachedBlock]:
        """The cached blocks of the longest cached prefix of the prompt, leaving at least its last
        position to compute (its state samples the first token)."""
        if not request.block_hashes:
            return []
        assert self.prefix_cache is not None  # block hashes are only computed with a cache
        limit = (request.prompt_embeds.shape[0] - 1) // self._block_positions
        return self.prefix_cache.match(request.block_hashes, limit)

    def _prefill(self, request: DecodeRequest, cached: list[CachedBlock], events: list) -> None:
        """Prefill the request alone (batch 1) straight into the next free KV slot, after copying its
        cached prefix there; sample its first token."""
        length = request.prompt_embeds.shape[0]
        slot = len(self.rows)
        self._kv.reserve(slot + 1, length)
        start = len(cached) * self._block_positions
        self._kv.write_blocks(slot, cached)
        embeds = request.prompt_embeds[start:].to(self._device, self._dtype)[None]
        positions = torch.arange(start, length, device=self._device)[None]
        # From position 0 attention is plainly causal; after a cached prefix each query sees keys 0..p.
        mask = (torch.arange(length, device=self._device) <= positions[..., None])[:, None] if start else None
        hidden = self._forward(embeds, positions, slice(slot, slot + 1), length, mask=mask)
        row = _Row(
            request,
            StreamingDetokenizer(self.tokenizer),
            request.params.generator(),
            length=length,
            seen=torch.zeros(self._vocab_size, dtype=torch.bool),
            cached_positions=start,
        )
        self.rows.append(row)
        self.prefill_positions_computed += length - start
        self.prefill_positions_reused += start
        if self.prefix_cache is not None:
            self.prefix_cache.stats.hits += len(cached)
            self.prefix_cache.stats.misses += len(request.block_hashes) - len(cached)
        self._sample_and_advance([row], hidden[:, -1], events)

    def _cache_prompt(self, request: DecodeRequest, cached_blocks: int, room: int) -> None:
        """Put the prompt's full blocks computed by this prefill into the cache (the row just
        admitted is the last slot)."""
        assert self.prefix_cache is not None
        chain = request.block_hashes
        if len(chain) > cached_blocks:
            blocks = self._kv.read_blocks(len(self.rows) - 1, cached_blocks, len(chain), self._block_positions)
            self.prefix_cache.insert(chain, cached_blocks, blocks, room)
        self.prefix_cache.evict_to(room)

    def _decode_step(self, events: list) -> None:
        """One step for every running row: 1 position each, or 8 when a row feeds its voken block."""
        counts = [len(row.next_input) for row in self.rows]  # 0 for a row aborted at this step
        width = max(counts)
        lengths = [row.length for row in self.rows]
        ids = [row.next_input + [self.eos_id] * (width - len(row.next_input)) for row in self.rows]
        if width == 1 and self.static_decode and self._static is not None:
            hidden = self._static.run([row_ids[0] for row_ids in ids], lengths)[:, None]
        else:
            hidden = self._dynamic_step(ids, lengths, width)
        live = [i for i, n in enumerate(counts) if n]
        for i in live:
            self.rows[i].length += counts[i]
            if counts[i] == NUM_VOKENS:
                self._emit_vokens(self.rows[i], hidden[i, :NUM_VOKENS], events)
        if live:
            states = hidden[live, [counts[i] - 1 for i in live]]  # each row's last fed position
            self._sample_and_advance([self.rows[i] for i in live], states, events)

    def _dynamic_step(self, ids: list[list[int]], lengths: list[int], width: int) -> torch.Tensor:
        """Every row's `width` ids at its own positions; attention spans the longest row only."""
        keys_total = max(lengths) + width
        self._kv.reserve(len(self.rows), keys_total)
        positions = (torch.tensor(lengths)[:, None] + torch.arange(width)).to(self._device)
        return self._decode_forward(torch.tensor(ids, device=self._device), positions, keys_total)

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, keys_total: int) -> torch.Tensor:
        """`ids` at `positions` [B, W] for the rows in slots 0..B-1, attending over `keys_total` positions.
        The dynamic step and the static (CUDA-graph) step both run this."""
        # A row's query at position p sees its keys 0..p: its padding and its slot's stale tail stay hidden.
        mask = (torch.arange(keys_total, device=self._device) <= positions[..., None])[:, None]
        embeds = self.llm.get_input_embeddings()(ids)
        return self._forward(embeds, positions, slice(0, ids.shape[0]), keys_total, mask)

    def _forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, slots: slice, keys_total: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Final-norm hidden states of `embeds` [B, W, H] at `positions` [B, W] for the rows in KV `slots`.
        Each layer writes its new keys/values into the slots in place, then attends over their first
        `keys_total` positions (`mask` [B, 1, W, keys_total]; None: causal over a fresh slot). The norms,
        projections, rotary embedding and MLP are the model's own modules; only the KV path is ours."""
        model = self.llm.model
        batch, width = positions.shape
        cos, sin = model.rotary_emb(embeds, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, W, 1, D]: the same for every head
        slot_index = torch.arange(slots.start, slots.stop, device=embeds.device)[:, None]
        hidden = embeds
        for layer, keys, values in zip(model.layers, self._kv.keys, self._kv.values):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            query = _rotate(attn.q_proj(x).view(batch, width, -1, attn.head_dim), cos, sin)
            keys[slot_index, :, positions] = _rotate(attn.k_proj(x).view(batch, width, -1, attn.head_dim), cos, sin)
            values[slot_index, :, positions] = attn.v_proj(x).view(batch, width, -1, attn.head_dim)
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2),
                keys[slots, :, :keys_total],
                values[slots, :, :keys_total],
                attn_mask=mask,
                is_causal=mask is None,
                scale=attn.scaling,
                enable_gqa=attn.num_key_value_groups > 1,
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.norm(hidden)

    def _emit_vokens(self, row: _Row, block_states: torch.Tensor, events: list) -> None:
        assert row.voken_source_state is not None  # set when the row sampled [IMG0]
        states = torch.cat([row.voken_source_state[None], block_states[: NUM_VOKENS - 1]]).float().cpu()
        row.voken_source_state = None
        row.images += 1
        row.record(self.voken_ids[1:])
        events.append(VokenStates(row.request_id, states, len(row.text)))

    def _sample_and_advance(self, rows: list[_Row], states: torch.Tensor, events: list) -> None:
        """Sample every row's next token from its final-norm state (one lm_head, one batched
        sampler) and handle what each token means."""
        live = []
        for index, row in enumerate(rows):
            row.next_input = []
            if row.sampled >= row.request.params.max_tokens:
                self._finish(row, "length", events)  # e.g. right after a voken block
            else:
                live.append(index)
        if not live:
            return
        rows = [rows[i] for i in live]
        states = states[live]
        logits = self.llm.lm_head(states).float()  # sampled on the model's device
        logits[:, self.banned_ids] = float("-inf")
        no_more_images = [i for i, row in enumerate(rows) if row.images >= row.request.params.max_images]
        logits[no_more_images, self.voken_ids[0]] = float("-inf")
        tokens = sample_tokens(
            logits, [r.request.params for r in rows], torch.stack([r.seen for r in rows]), [r.generator for r in rows]
        )
        for row, token, state in zip(rows, tokens, states):
            self._advance(row, self._force_image(row, token), state, events)

    def _force_image(self, row: _Row, token: int) -> int:
        """force_image: the answer holds `max_images` images. Mode `first` (upstream's force_generation,
        generation_helper.py:208-211: [IMG0] while none was generated) makes [IMG0] the first sampled
        id, so the first image is conditioned on the prompt alone. The images still missing (all of
        them in mode `end`) are forced where the answer would end: at EOS, at `###`, or in its last
        sampled slots (one per missing image: a block's 7 forced vokens do not count)."""
        params = row.request.params
        missing = params.max_images - row.images if params.force_image else 0
        if missing <= 0:
            return token
        if params.force_image_mode == "first" and row.images == 0:
            return self.voken_ids[0]
        if params.max_tokens - row.sampled <= missing:
            return self.voken_ids[0]
        if token == self.eos_id or STOP_TEXT in row.held + row.detokenizer.peek(token):
            return self.voken_ids[0]
        return token

    def _advance(self, row: _Row, token: int, state: torch.Tensor, events: list) -> None:
        row.record([token])
        row.sampled += 1
        if token == self.voken_ids[0]:
            self._flush_text(row, events)
            row.voken_source_state = state.clone()
            row.next_input = list(self.voken_ids)
            return
        if token == self.eos_id:
            return self._finish(row, "stop", events)
        if self._push_text(row, token, events):
            return self._finish(row, "stop", events)
        if row.sampled >= row.request.params.max_tokens:
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
        row.held = pending[len(pending) - keep :] if keep else ""
        self._release(row, pending[: len(pending) - keep], events)
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
                events.append(
                    Finished(
                        row.request_id,
                        row.finish_reason,
                        len(row.generated),
                        vokens,
                        row.images,
                        row.text,
                        row.generated,
                        row.sampled,
                        row.cached_positions,
                    )
                )
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self._kv.compact(keep, max((row.length for row in self.rows), default=0))

    @torch.inference_mode()
    def static_step_error(self) -> float | None:
        """max |static − dynamic| / max |dynamic| of the final-norm states of the running rows' next
        1-token step, computed both ways without taking the step (both write the keys and values the
        step itself will write). A check of the CUDA graphs on a real GPU; None when it cannot apply."""
        if self._static is None or not self.rows or any(len(row.next_input) != 1 for row in self.rows):
            return None
        ids, lengths = [row.next_input[0] for row in self.rows], [row.length for row in self.rows]
        static = self._static.run(ids, lengths).float()
        dynamic = self._dynamic_step([[i] for i in ids], lengths, 1)[:, 0].float()
        return float((static - dynamic).abs().max() / dynamic.abs().max())

    def drop_running(self) -> list[str]:
        """Forget every running row (after a failed step); returns their request ids."""
        dropped = [row.request_id for row in self.rows]
        self.rows = []
        return dropped

    @property
    def decode_mode(self) -> str:
        """How 1-token steps run: 'CUDA graphs', 'static shapes, eager' (tests) or 'eager'."""
        if not self.static_decode or self._static is None:
            return "eager"
        return "CUDA graphs" if self._static.capture else "static shapes, eager"

    @property
    def kv_positions_in_use(self) -> int:
        """KV positions held by the running rows (rows × slot length, over-allocation included)."""
        return len(self.rows) * self._kv.slot_positions


class _KVSlots:
    """Keys and values of every layer, [row slots, KV heads, positions, head dim], written in place.

    Row i of the running batch owns slot i and its valid positions are 0..length-1, so a step writes
    its new positions where they belong instead of re-concatenating the cache, and admitting a row
    writes only that row. A pool: both axes grow geometrically up to the peak load seen (a growth
    copies the storage once) and are kept, so a warm engine admits without allocating; finished rows
    are compacted out at once and their slots reused."""

    POSITION_ALIGN = 64

    def __init__(self, llm, max_rows: int):
        config = llm.config
        self.max_rows = max_rows
        self.max_positions = config.max_position_embeddings
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype, self.device = llm.dtype, llm.device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def slot_positions(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, rows: int, positions: int) -> None:
        """Room for `rows` slots of at least `positions` positions, keeping what is stored."""
        have_rows = self.keys[0].shape[0] if self.keys else 0
        have_positions = self.slot_positions
        if rows <= have_rows and positions <= have_positions:
            return
        rows = _capacity(have_rows, rows, 2 * have_rows, self.max_rows)
        grown_positions = _round_up(max(positions, have_positions * 3 // 2), self.POSITION_ALIGN)
        positions = _capacity(have_positions, positions, grown_positions, self.max_positions)
        # Zeros, not empty: masked-out positions still meet attention's weights (0 * NaN would be NaN).
        shape = (rows, self.kv_heads, positions, self.head_dim)
        grown = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * self.layers)]
        for new, old in zip(grown, self.keys + self.values):
            new[: old.shape[0], :, : old.shape[2]] = old
        self.keys, self.values = grown[: self.layers], grown[self.layers :]

    def write_blocks(self, slot: int, blocks: list[CachedBlock]) -> None:
        """Copy cached blocks into the first positions of `slot`: one copy per layer and tensor (a
        layer at a time, so the staging copy is one layer's, not the whole prefix's)."""
        positions = sum(b.keys.shape[2] for b in blocks)
        for layer in range(self.layers if blocks else 0):
            self.keys[layer][slot, :, :positions] = torch.cat([b.keys[layer] for b in blocks], dim=1)
            self.values[layer][slot, :, :positions] = torch.cat([b.values[layer] for b in blocks], dim=1)

    def read_blocks(self, slot: int, first: int, stop: int, size: int) -> list[CachedBlock]:
        """Copies of blocks `first`..`stop`-1 (of `size` positions) of `slot`, for the prefix cache."""
        span = slice(first * size, stop * size)
        keys = torch.stack([k[slot, :, span] for k in self.keys])
        values = torch.stack([v[slot, :, span] for v in self.values])
        return [CachedBlock(k.clone(), v.clone()) for k, v in zip(keys.split(size, dim=2), values.split(size, dim=2))]

    def compact(self, keep: list[int], positions: int) -> None:
        """Move the slots `keep` (ascending) to the front, in order; only their first `positions` matter."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=self.device)
        for tensor in self.keys + self.values:
            tensor[: len(keep), :, :positions] = tensor[:, :, :positions].index_select(0, index)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, transformers' LLaMA formula (x·cos + rotate_half(x)·sin)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _capacity(have: int, need: int, grown: int, limit: int) -> int:
    """`have` when it suffices, else the geometric step `grown` (at least `need`, at most `limit`)."""
    return have if need <= have else max(need, min(grown, limit))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
