"""Unit tests of the Triton model logic (minigpt5/serving, model_repository/*/1/model.py) without Triton:
`triton_python_backend_utils` is replaced by tests/support/fake_pb_utils.py, the real model classes run on
the tiny weights, and the BLS model's child calls go in-process to the real child model instances
(through the fake's `InferenceRequest.exec`, which copies tensors, checks inputs against each
child's config.pbtxt and returns only the requested outputs, as the server does)."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt5.engine import TextDelta
from minigpt5.prompt import parse_history
from support import fake_pb_utils

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
PB_MODULE = "triton_python_backend_utils"
# Modules that import triton_python_backend_utils (directly or through triton_io): imported here
# after the fake is installed, and dropped again afterwards so nothing else sees them bound to it.
PB_BOUND = (
    "triton_io",
    "metrics",
    "answer_stream",
    "dispatch",
    "vision_encoder_model",
    "image_decoder_model",
    "vicuna_decoder_model",
    "minigpt5_model",
)
MODEL_DIRS = ("vision_encoder", "image_decoder", "vicuna_decoder", "minigpt5")

# Batched vs alone: float rounding in batched matmuls only. Vision embeddings within 1e-5; images
# (UNet/VAE in a batch, then rounded to uint8) within 2 levels — the same bound test_serving.py uses.
EMBED_TOLERANCE = 1e-5
BATCHED_IMAGE_TOLERANCE = 2
WAIT_S = 60.0  # upper bound for any one wait; the tiny model answers in well under a second

DECODER_BUDGET = 1000  # kv_cache_budget_tokens of the decoder under test (context: 1024 positions)
PROMPT = [1] + list(range(10, 30))  # BOS + 20 ordinary ids: the decoder takes any prompt ids
# Greedy without repetition penalty: this tiny model then runs to max_tokens (no "###"/EOS), which
# gives a request that is still running when the test aborts it (~1 ms per token here).
LONG = {"max_tokens": 900, "temperature": 0.0, "repetition_penalty": 1.0}
NUMPY = {
    "TYPE_INT32": np.int32,
    "TYPE_FP32": np.float32,
    "TYPE_UINT64": np.uint64,
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
}
# Public requests: 1-step image decoding keeps each image well under a second on CPU.
STORY = {
    "text_input": "Tell me a story about a red kite.",
    "force_image": True,
    "max_tokens": 24,
    "random_seed": 7,
    "num_inference_steps": 1,
}


# ---- installing the fake --------------------------------------------------------------------------
def _drop_pb_bound_modules() -> None:
    package = sys.modules.get("minigpt5.serving")
    for short in PB_BOUND:
        sys.modules.pop(f"minigpt5.serving.{short}", None)
        if package is not None and short in vars(package):
            delattr(package, short)  # else `from . import triton_io` would find the stale attribute
    for name in MODEL_DIRS:
        sys.modules.pop(f"_model_repository_{name}", None)


@pytest.fixture(scope="module")
def pb():
    previous = sys.modules.get(PB_MODULE)
    _drop_pb_bound_modules()
    sys.modules[PB_MODULE] = fake_pb_utils
    fake_pb_utils.clear_models()
    fake_pb_utils.reset_metrics()
    yield fake_pb_utils
    fake_pb_utils.clear_models()
    _drop_pb_bound_modules()
    if previous is None:
        sys.modules.pop(PB_MODULE, None)
    else:
        sys.modules[PB_MODULE] = previous


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a shared 2-core machine
    (another suite running beside this one) OpenMP's spinning threads made image decoding 5-30x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def serving(pb):
    """The serving modules, imported with the fake in place."""
    return types.SimpleNamespace(
        **{short: importlib.import_module(f"minigpt5.serving.{short}") for short in PB_BOUND + ("decoder_link",)}
    )


@pytest.fixture(scope="module")
def configs():
    return {name: fake_pb_utils.load_config(REPOSITORY / name / "config.pbtxt") for name in MODEL_DIRS}


@pytest.fixture(scope="module")
def make_args(configs, tiny_weights):
    def make(name: str, **parameters) -> dict:
        return fake_pb_utils.triton_args(configs[name], "CPU", weights=str(tiny_weights), **parameters)

    return make


@pytest.fixture(scope="module")
def hidden(tiny_weights) -> int:
    return json.loads((Path(tiny_weights) / "manifest.json").read_text())["architecture"]["llm"]["hidden_size"]


# ---- helpers ----------------------------------------------------------------------------------------
def outputs(response) -> dict:
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def values(response) -> dict:
    """Outputs as Python lists (STRING elements decoded)."""
    return {
        name: [v.decode() if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
        for name, array in outputs(response).items()
    }


def new_threads(before: set, *names: str) -> list:
    return [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith(names)]


def wait_until(predicate, timeout: float = WAIT_S, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def assert_one_final_error(sender, code: int, *words: str) -> str:
    sent = sender.wait_final(WAIT_S)
    assert len(sent) == 1, f"expected exactly one response, got {sent}"
    response, flags = sent[0]
    assert flags == fake_pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert response is not None and response.has_error(), response
    error = response.error()
    assert error.code() == code, f"{error!r}: expected code {fake_pb_utils.TritonError._NAMES[code]}"
    for word in words:
        assert word in error.message(), f"{word!r} not in {error.message()!r}"
    return error.message()


def public_request(configs, request_id: str = "", **params):
    spec = configs["minigpt5"]["input"]
    inputs = {}
    for name, value in params.items():
        kind = spec[name]["data_type"]
        if kind == "TYPE_STRING":
            inputs[name] = value if isinstance(value, list) else [value]
        elif name == "images":
            inputs[name] = np.asarray(value, dtype=np.uint8)
        else:
            inputs[name] = np.array([value], dtype=NUMPY[kind])
    return fake_pb_utils.make_request(inputs, request_id, configs["minigpt5"])


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def public_events(sender, config) -> list[dict]:
    events = []
    for response, _ in sender.sent:
        if response is None:
            continue
        assert not response.has_error(), response
        assert fake_pb_utils.check_outputs(config, response) is None, fake_pb_utils.check_outputs(config, response)
        events.append(values(response))
    return events


def _metric(name: str, label: str, **labels) -> float:
    return fake_pb_utils.metric_value(name, model=label, **labels)


# ---- model fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision(serving, make_args):
    return serving.vision_encoder_model.VisionEncoder(make_args("vision_encoder"))


@pytest.fixture(scope="module")
def image_model(serving, make_args):
    return serving.image_decoder_model.ImageDecoderModel(
        make_args("image_decoder"), metrics=serving.metrics.ImageMetrics("image_decoder_units")
    )


@pytest.fixture(scope="module")
def decoder_model(serving, make_args):
    model = serving.vicuna_decoder_model.VicunaDecoderModel(
        make_args("vicuna_decoder", kv_cache_budget_tokens=DECODER_BUDGET),
        metrics=serving.metrics.DecoderMetrics("vicuna_decoder_units"),
    )
    yield model
    model.finalize()


@pytest.fixture(scope="module")
def engine(decoder_model):
    return decoder_model.loop.engine


@pytest.fixture(scope="module")
def children(pb, configs, vision, image_model, decoder_model):
    """The BLS model's child models, served in-process by the fake's exec."""
    pb.register_model("vision_encoder", vision, config=configs["vision_encoder"])
    pb.register_model("image_decoder", image_model, config=configs["image_decoder"])
    pb.register_model("vicuna_decoder", decoder_model, config=configs["vicuna_decoder"])
    yield
    pb.clear_models()


@pytest.fixture(scope="module")
def decoder(serving, children):
    """`minigpt5`'s link to `vicuna_decoder`, making the BLS calls `minigpt5` makes (through the fake)."""
    link = serving.decoder_link.DecoderLink(serving.minigpt5_model.MiniGPT5Model._call_decoder)
    yield link
    link.close()


@pytest.fixture(scope="module")
def reference_engine(tiny_weights):
    """A decoder of its own, driven in this thread: what a lone request gives without Triton."""
    from minigpt5.stages import DecoderStage
    from minigpt5.weights.layout import WeightsDir

    return DecoderStage.load(WeightsDir(tiny_weights), kv_budget_tokens=DECODER_BUDGET)


@pytest.fixture(scope="module")
def make_bls(serving, make_args, children):
    """MiniGPT5Model instances, each with its own metrics label; finalized at the end."""
    made = []

    def make(label: str, **parameters):
        model = serving.minigpt5_model.MiniGPT5Model(
            make_args("minigpt5", **parameters), metrics=serving.metrics.PublicModelMetrics(label)
        )
        made.append(model)
        return model

    yield make
    for model in made:
        model.finalize()


@pytest.fixture(scope="module")
def bls(make_bls):
    return make_bls("minigpt5_units")


# ================================== vision_encoder ================================================
def test_vision_encoder_splits_one_batch_back_per_request(pb, vision, configs, hidden):
    config = configs["vision_encoder"]
    rng = np.random.RandomState(0)
    batches = [rng.randint(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (1, 3, 2)]
    replies = vision.execute([pb.make_request({"images": b}, config=config) for b in batches])
    assert len(replies) == len(batches)
    for batch, reply in zip(batches, replies):
        assert not reply.has_error()
        assert pb.check_outputs(config, reply) is None
        embeds = outputs(reply)["image_embeds"]
        assert embeds.shape == (len(batch), 32, hidden) and embeds.dtype == np.float32
        alone = vision.stage.encode(batch).numpy()
        np.testing.assert_allclose(embeds, alone, rtol=0, atol=EMBED_TOLERANCE)


# ================================== image_decoder =================================================
def _image_request(config, states, seeds, scales, steps, schedulers):
    return fake_pb_utils.make_request(
        {
            "voken_states": np.asarray(states, dtype=np.float32),
            "seed": np.array([[s] for s in seeds], dtype=np.uint64),
            "guidance_scale": np.array([[g] for g in scales], dtype=np.float32),
            "num_inference_steps": np.array([[n] for n in steps], dtype=np.int32),
            "scheduler_id": np.array([[k] for k in schedulers], dtype=np.int32),
        },
        config=config,
    )


def test_image_decoder_rows_equal_their_lone_decode_and_are_grouped_by_schedule(
    pb, image_model, configs, hidden, monkeypatch
):
    config = configs["image_decoder"]
    rng = np.random.RandomState(1)
    # (seed, guidance, steps, scheduler_id) per row; requests hold 2, 1 and 2 rows.
    rows = [[(11, 7.5, 2, 0), (12, 2.0, 2, 0)], [(13, 5.0, 1, 0)], [(14, 7.5, 2, 1), (11, 3.0, 2, 0)]]
    states = [rng.randn(len(r), 8, hidden).astype(np.float32) for r in rows]
    requests = [_image_request(config, s, *zip(*r)) for s, r in zip(states, rows)]

    calls = []
    real_decode = image_model.stage.decoder.decode

    def spy(jobs, *args, **kwargs):
        calls.append(sorted({job.batch_key for job in jobs}) + [len(jobs)])
        return real_decode(jobs, *args, **kwargs)

    monkeypatch.setattr(image_model.stage.decoder, "decode", spy)
    replies = image_model.execute(requests)
    # one UNet batch per (scheduler, steps, guidance on): 3 rows of pndm/2, 1 of pndm/1, 1 of dpm/2
    assert sorted(calls, key=str) == sorted(
        [[("pndm", 2, True), 3], [("pndm", 1, True), 1], [("dpm", 2, True), 1]], key=str
    )

    assert len(replies) == len(requests)
    for reply, request_rows, request_states in zip(replies, rows, states):
        assert not reply.has_error()
        assert pb.check_outputs(config, reply) is None
        images = outputs(reply)["image"]
        assert images.dtype == np.uint8 and images.shape[0] == len(request_rows) and images.shape[3] == 3
        for i, row in enumerate(request_rows):
            alone = outputs(image_model.execute([_image_request(config, request_states[i : i + 1], *zip(row))])[0])
            diff = np.abs(images[i].astype(int) - alone["image"][0].astype(int)).max()
            assert diff <= BATCHED_IMAGE_TOLERANCE, f"row {row}: {diff} levels from its lone decode"
    assert 5.0 in pb.histogram_observations("minigpt5_image_batch_size", model="image_decoder_units")


# ================================== vicuna_decoder and the link ===================================
def _sampling(**params):
    from minigpt5.sampling import SamplingParams

    return SamplingParams(**params)


def _drain(stream, timeout: float = WAIT_S) -> list:
    """A stream's events up to and including its Finished."""
    from minigpt5.engine import Finished

    events, deadline = [], time.monotonic() + timeout
    while not events or not isinstance(events[-1], Finished):
        assert time.monotonic() < deadline, f"no Finished after {timeout} s: {events[-3:]}"
        event = stream.next_event(timeout=deadline - time.monotonic())
        if event is not None:
            events.append(event)
    return events


def _alone(stage, request_id: str, prompt_ids: list[int], sampling, image_embeds=None) -> list:
    """The events of one request decoded alone, in process."""
    import torch

    embeds = None if image_embeds is None else torch.from_numpy(image_embeds)
    stage.engine.submit(stage.make_request(request_id, prompt_ids, embeds, sampling))
    events = []
    while stage.engine.has_work:
        events += stage.engine.step()
    return events


def _text(events: list) -> str:
    return "".join(e.text for e in events if type(e).__name__ == "TextDelta")


def test_link_streams_what_the_decoder_alone_gives(pb, decoder, reference_engine, hidden, tiny_weights):
    """Text, voken states and counts through minigpt5's link and vicuna_decoder (BLS) equal a lone
    in-process decode: with and without image embeddings, two requests in flight at once."""
    from minigpt5.engine import Finished, TextDelta, VokenStates

    placeholder = json.loads((Path(tiny_weights) / "manifest.json").read_text())["tokens"]["image_placeholder"]
    image = np.random.default_rng(0).standard_normal((1, 32, hidden)).astype(np.float32)
    cases = [
        ("units-text", PROMPT, None, _sampling(max_tokens=24, seed=3)),
        (
            "units-image",
            PROMPT[:1] + [placeholder] + PROMPT[1:],
            image,
            _sampling(max_tokens=16, seed=4, force_image=True),
        ),
    ]
    streams = [decoder.open(rid, ids, embeds, sampling) for rid, ids, embeds, sampling in cases]
    for stream, (rid, ids, embeds, sampling) in zip(streams, cases):
        events = _drain(stream)
        body, final = events[:-1], events[-1]
        alone = _alone(reference_engine, rid, ids, sampling, embeds)
        expected = next(e for e in alone if isinstance(e, Finished))
        assert all(isinstance(e, (TextDelta, VokenStates)) for e in body), body
        assert (final.reason, final.completion_tokens, final.vokens, final.images) == (
            expected.reason,
            expected.completion_tokens,
            expected.vokens,
            expected.images,
        )
        assert _text(body) == _text(alone) == expected.text
        vokens = [e for e in body if isinstance(e, VokenStates)]
        alone_vokens = [e for e in alone if isinstance(e, VokenStates)]
        assert len(vokens) == len(alone_vokens) == (1 if embeds is not None else 0)
        for got, want in zip(vokens, alone_vokens):
            assert got.states.shape == (8, hidden) and got.text_offset == want.text_offset
            np.testing.assert_allclose(got.states, want.states.numpy(), atol=1e-5)
        assert stream.next_event(timeout=0.05) is None  # nothing after Finished
    assert decoder.open_streams == 0
    # the rows of each step, recorded off the engine thread
    assert wait_until(
        lambda: 2 in pb.histogram_observations("minigpt5_decoder_batch_size", model="vicuna_decoder_units")
    )


def test_queued_text_deltas_come_out_as_one_in_order():
    """A request thread that fell behind gets the text queued so far in one event; nothing is
    reordered across an image's voken states, and a step failure is still raised in its place."""
    from minigpt5.engine import Finished, TextDelta, VokenStates
    from minigpt5.serving.decoder_link import DecodeStream

    stream = DecodeStream(link=None, request_id="r")
    states = VokenStates("r", np.zeros((8, 4), np.float32), 6)
    for event in (
        TextDelta("r", "Once "),
        TextDelta("r", "upon"),
        states,
        TextDelta("r", " a"),
        TextDelta("r", " time."),
        Finished("r", "stop", 5, 8, 1, ""),
    ):
        stream.put(event)
    received = [stream.next_event(timeout=1.0) for _ in range(4)]
    assert received[0] == TextDelta("r", "Once upon") and received[1] is states
    assert received[2] == TextDelta("r", " a time.") and isinstance(received[3], Finished)
    assert stream.next_event(timeout=0.01) is None
    stream.put(TextDelta("r", "x"))
    stream.put(RuntimeError("decoder step failed"))
    assert stream.next_event(timeout=1.0) == TextDelta("r", "x")
    with pytest.raises(RuntimeError, match="step failed"):
        stream.next_event(timeout=1.0)


def test_wire_merges_a_requests_text_and_keeps_every_event_in_order():
    from minigpt5.engine import Finished, TextDelta, VokenStates
    from minigpt5.errors import InvalidRequest
    from minigpt5.serving.decoder_wire import Failure, decode_events, encode_events

    states = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    events = [
        TextDelta("a", "Once"),
        TextDelta("b", "Hi"),
        TextDelta("a", " upon"),
        VokenStates("a", states, 9),
        TextDelta("a", " a"),
        Finished("a", "length", 12, 8, 1, "Once upon a"),
        Failure("c", InvalidRequest("kv_cache_budget_tokens: too long")),
    ]
    got = decode_events(*encode_events(events))
    assert got[:2] == [TextDelta("a", "Once upon"), TextDelta("b", "Hi")]
    assert got[2].request_id == "a" and got[2].text_offset == 9 and np.array_equal(got[2].states, states)
    assert got[3] == TextDelta("a", " a")
    assert (got[4].request_id, got[4].reason, got[4].completion_tokens, got[4].vokens) == ("a", "length", 12, 8)
    assert isinstance(got[5].error, InvalidRequest) and "kv_cache_budget_tokens" in str(got[5].error)


def test_decoder_metrics_count_waiting_running_and_kv_use(serving):
    """The gauges follow the engine's figures, set by the metrics thread from the snapshots the engine
    thread queues; the last snapshot of a burst (engine idle) is always recorded."""
    from types import SimpleNamespace

    metrics = serving.metrics.DecoderMetrics("vicuna_decoder_gauges")
    engine = SimpleNamespace(
        prefix_cache=None,
        prefill_positions_computed=0,
        prefill_positions_reused=0,
        num_waiting=3,
        rows=[object()] * 2,
        reserved_positions=250,
        kv_budget_tokens=1000,
        has_work=True,
        step_prefill_seconds=[0.5, 0.25],
    )
    try:
        metrics.observe_step(engine)
        label = "vicuna_decoder_gauges"
        assert wait_until(lambda: _metric("minigpt5_num_requests_waiting", label) == 3)
        assert _metric("minigpt5_num_requests_running", label) == 2
        assert _metric("minigpt5_kv_cache_used_positions", label) == 250
        assert _metric("minigpt5_kv_cache_usage_ratio", label) == 0.25
        assert fake_pb_utils.histogram_observations("minigpt5_prefill_latency_seconds", model=label) == [0.5, 0.25]
        engine.num_waiting, engine.rows, engine.reserved_positions = 0, [], 0
        engine.has_work, engine.step_prefill_seconds = False, []
        metrics.observe_step(engine)  # within STATE_METRICS_INTERVAL_S, but the engine is idle now
        assert wait_until(lambda: _metric("minigpt5_num_requests_waiting", label) == 0)
        assert wait_until(lambda: _metric("minigpt5_kv_cache_usage_ratio", label) == 0)
        assert _metric("minigpt5_num_requests_running", label) == 0
        assert fake_pb_utils.histogram_observations("minigpt5_decoder_batch_size", model=label) == [2]
    finally:
        metrics.close()


def test_batch_dispatcher_reports_each_jobs_wait_and_the_call(serving):
    reported, calling, gate = [], threading.Event(), threading.Event()

    def call(jobs):
        calling.set()
        gate.wait(WAIT_S)
        return jobs

    dispatcher = serving.dispatch.BatchDispatcher(
        "units-timing",
        call,
        rows=lambda job: 1,
        max_rows=8,
        on_call=lambda waits, seconds: reported.append((waits, seconds)),
    )
    try:
        first = dispatcher.submit("a")  # its call waits on the gate; the next two queue behind it
        assert calling.wait(WAIT_S)
        later = [dispatcher.submit("b"), dispatcher.submit("c")]
        time.sleep(0.05)
        gate.set()
        assert [f.result(WAIT_S) for f in [first, *later]] == ["a", "b", "c"]
        assert wait_until(lambda: len(reported) == 2)
        (first_waits, first_call), (later_waits, later_call) = reported
        assert len(first_waits) == 1 and len(later_waits) == 2  # one call for the jobs that queued together
        assert first_call >= 0.05 and min(later_waits) >= 0.05  # b and c waited for a's call
    finally:
        dispatcher.close()


def test_decoder_refuses_a_request_beyond_the_kv_budget_and_serves_the_others(decoder):
    from minigpt5.errors import InvalidRequest

    first = decoder.open("units-ok-1", PROMPT, None, _sampling(max_tokens=12, seed=5))
    oversize = decoder.open("units-oversize", PROMPT, None, _sampling(max_tokens=990, seed=6))  # 21+990+7 > 1000
    last = decoder.open("units-ok-2", PROMPT, None, _sampling(max_tokens=12, seed=7))
    with pytest.raises(InvalidRequest, match=f"kv_cache_budget_tokens.*|.*{DECODER_BUDGET}"):
        _drain(oversize)
    for stream in (first, last):
        assert _drain(stream)[-1].reason in ("stop", "length")


def test_decoder_abort_frees_the_row_and_sends_nothing_more(decoder, engine):
    stream = decoder.open("units-long", PROMPT, None, _sampling(seed=1, **LONG))
    assert stream.next_event(timeout=WAIT_S) is not None, "no first token"
    stream.abort()
    assert wait_until(lambda: not engine.has_work), "the aborted row is still in the batch"
    assert engine.kv_positions_in_use == 0
    while (event := stream.next_event(timeout=0.2)) is not None:  # what the last call carried before the abort
        assert type(event).__name__ == "TextDelta", event
    after = decoder.open("units-after", PROMPT, None, _sampling(max_tokens=4, seed=2))
    assert _drain(after)[-1].reason in ("stop", "length")


def test_abort_before_the_request_was_sent_never_reaches_the_decoder(serving):
    calls = []
    link = serving.decoder_link.DecoderLink(lambda *call: calls.append(call) or ("[]", None))
    try:
        link._state.acquire()  # hold the link thread back while the request comes and goes
        try:
            stream = link.open("units-never", PROMPT, None, _sampling(max_tokens=4))
            stream.abort()
        finally:
            link._state.release()
        time.sleep(0.2)
        assert calls == [] and link.open_streams == 0
    finally:
        link.close()


def test_engine_loop_close_ends_open_requests_and_joins_its_thread(tiny_weights):
    from minigpt5.errors import Overloaded
    from minigpt5.serving.decoder_wire import Failure, NewRequest
    from minigpt5.stages import DecoderStage
    from minigpt5.weights.layout import WeightsDir

    decoder_model = importlib.import_module("minigpt5.serving.vicuna_decoder_model")
    before = set(threading.enumerate())
    loop = decoder_model.EngineLoop(DecoderStage.load(WeightsDir(tiny_weights), kv_budget_tokens=DECODER_BUDGET))
    assert len(new_threads(before, "minigpt5-engine")) == 1
    loop.submit("link-a", NewRequest("units-unload", PROMPT, _sampling(seed=1, **LONG)))
    assert loop.collect("link-a", WAIT_S), "no first events"
    started = time.monotonic()
    loop.close()
    assert time.monotonic() - started < 30
    assert new_threads(before, "minigpt5-engine") == []  # clean unload
    left = loop.collect("link-a", 0.0)
    assert isinstance(left[-1], Failure) and isinstance(left[-1].error, Overloaded)
    loop.submit("link-a", NewRequest("units-late", PROMPT, _sampling(max_tokens=4)))
    (late,) = loop.collect("link-a", 0.0)
    assert isinstance(late.error, Overloaded) and "unloading" in str(late.error)


def test_held_text_is_gathered_until_due_unless_another_event_comes():
    """The stream interval: text after a text response waits until `hold_text_until` and goes out as
    one delta; an image's voken states (or the end) cut the wait short, in order."""
    from minigpt5.engine import TextDelta, VokenStates
    from minigpt5.serving.decoder_link import DecodeStream

    stream = DecodeStream(link=None, request_id="r")
    interval = 1.0
    stream.put(TextDelta("r", " upon"))
    threading.Timer(0.2, stream.put, args=(TextDelta("r", " a"),)).start()
    started = time.monotonic()
    assert stream.next_event(5.0, hold_text_until=started + interval) == TextDelta("r", " upon a")
    assert time.monotonic() - started >= interval * 0.9
    states = VokenStates("r", np.zeros((8, 4), np.float32), 9)
    stream.put(TextDelta("r", " time"))
    threading.Timer(0.2, stream.put, args=(states,)).start()
    started = time.monotonic()
    assert stream.next_event(5.0, hold_text_until=started + interval) == TextDelta("r", " time")
    assert time.monotonic() - started < interval * 0.9  # cut short by the voken states
    assert stream.next_event(5.0, hold_text_until=time.monotonic() + interval) is states


def test_link_close_ends_open_streams_and_joins_its_thread(serving, children):
    from minigpt5.errors import Overloaded

    before = set(threading.enumerate())
    link = serving.decoder_link.DecoderLink(serving.minigpt5_model.MiniGPT5Model._call_decoder)
    assert len(new_threads(before, "minigpt5-decoder-link")) == 1
    stream = link.open("units-link-close", PROMPT, None, _sampling(seed=1, **LONG))
    assert stream.next_event(timeout=WAIT_S) is not None
    link.close()
    assert new_threads(before, "minigpt5-decoder-link") == []
    with pytest.raises(Overloaded, match="unloading"):
        while stream.next_event(timeout=1.0) is not None:
            pass
    with pytest.raises(Overloaded, match="unloading"):
        link.open("units-late", PROMPT, None, _sampling(max_tokens=4))
    stream.abort()  # what minigpt5 does next; the decoder drops the row


def test_a_failed_call_fails_the_open_streams_and_the_link_goes_on(serving):
    from minigpt5.engine import Finished

    replies = [
        RuntimeError("vicuna_decoder is not ready"),
        (
            '[{"id": "units-2", "type": "finished", "reason": "stop", "completion_tokens": 1, '
            '"vokens": 0, "images": 0}]',
            None,
        ),
    ]
    calls = []

    def call(*args):
        calls.append(args)
        reply = replies.pop(0) if replies else ("[]", None)
        if isinstance(reply, Exception):
            raise reply
        return reply

    link = serving.decoder_link.DecoderLink(call)
    try:
        first = link.open("units-1", PROMPT, None, _sampling(max_tokens=4))
        with pytest.raises(RuntimeError, match="not ready"):
            first.next_event(timeout=WAIT_S)
        second = link.open("units-2", PROMPT, None, _sampling(max_tokens=4))
        assert isinstance(second.next_event(timeout=WAIT_S), Finished)
        assert any('"units-1"' in c[1] and '"abort"' in c[1] for c in calls[1:]), "the failed request was not aborted"
    finally:
        link.close()


# ================================== minigpt5 (BLS) ================================================
@pytest.fixture(scope="module")
def streamed(pb, bls, configs):
    """One streaming request on `bls` (seeded): its events, its sender, the child calls it made."""
    calls_before = {name: len(pb.calls_to(name)) for name in ("vision_encoder", "image_decoder", "vicuna_decoder")}
    request = public_request(configs, "units-stream", stream=True, **STORY)
    bls.execute([request])
    sender = request.get_response_sender()
    sender.wait_final(WAIT_S)
    child_calls = [call for name, before in calls_before.items() for call in pb.calls_to(name)[before:]]
    return types.SimpleNamespace(
        events=public_events(sender, configs["minigpt5"]), sender=sender, child_calls=child_calls
    )


def test_bls_stream_gives_text_image_start_image_final_in_order(pb, streamed):
    events = streamed.events
    kinds = [e["event_type"][0] for e in events]
    assert [e["sequence_index"][0] for e in events] == list(range(len(events)))
    assert kinds[0] == "image_start" and kinds[-1] == "final"  # force_image (mode first): the image leads
    assert kinds.count("image_start") == 1 and kinds.count("image") == 1 and kinds.count("final") == 1
    assert kinds.index("image_start") < kinds.index("image")
    assert set(kinds) == {"text", "image_start", "image", "final"}
    flags = [f for _, f in streamed.sender.sent]
    assert flags == [0] * (len(flags) - 1) + [pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL]

    start, image, final = (events[kinds.index(k)] for k in ("image_start", "image", "final"))
    assert start["image_offset"] == image["image_offset"]
    text = "".join(e["text_output"][0] for e in events)
    assert image["image_offset"][0] == 0 and text
    pixels = png_pixels(image["image_output"][0])
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[0] == pixels.shape[1]

    assert final["finish_reason"][0] in ("stop", "length")
    usage = json.loads(final["usage"][0])
    assert usage["images"] == 1 and usage["vokens"] == 8 and usage["image_tokens"] == 0
    assert usage["seed"] == STORY["random_seed"] and usage["prompt_tokens"] > 0
    assert 8 <= usage["completion_tokens"] <= STORY["max_tokens"] + 7


def test_bls_child_calls_are_unary(pb, streamed):
    """Triton 2.51 hangs or crashes under concurrent decoupled BLS streams (docs/RELIABILITY.md): the
    BLS model makes none. Here (no input image): unary vicuna_decoder link calls and one image_decoder call."""
    assert {c.decoupled for c in streamed.child_calls} == {False}
    models = [c.model_name for c in streamed.child_calls]
    assert models.count("image_decoder") == 1 and set(models) == {"image_decoder", "vicuna_decoder"}
    assert not any(c.responses[-1].has_error() for c in streamed.child_calls)


def test_bls_metrics_after_a_request(pb, bls, streamed):
    label = "minigpt5_units"
    usage = json.loads(streamed.events[-1]["usage"][0])
    assert wait_until(lambda: _metric("minigpt5_inflight_requests", label) == 0), "inflight not back to 0"
    assert _metric("minigpt5_requests_total", label, outcome="ok") == 1
    for outcome in ("invalid", "overloaded", "cancelled", "error"):
        assert _metric("minigpt5_requests_total", label, outcome=outcome) == 0, outcome
    assert _metric("minigpt5_generated_tokens_total", label) == usage["completion_tokens"] - usage["vokens"]
    assert _metric("minigpt5_vokens_total", label) == 8
    assert _metric("minigpt5_images_total", label) == 1
    assert len(pb.histogram_observations("minigpt5_time_to_first_token_seconds", model=label)) == 1
    assert len(pb.histogram_observations("minigpt5_time_to_first_image_seconds", model=label)) == 1
    # recorded by the model's metrics thread: one observation per answer, per image, per stage call
    assert wait_until(lambda: len(pb.histogram_observations("minigpt5_image_queue_wait_seconds", model=label)) == 1)
    assert pb.histogram_observations("minigpt5_request_prompt_tokens", model=label) == [usage["prompt_tokens"]]
    (e2e,) = pb.histogram_observations("minigpt5_e2e_request_latency_seconds", model=label)
    ttft = pb.histogram_observations("minigpt5_time_to_first_token_seconds", model=label)[0]
    assert e2e >= ttft > 0
    (per_token,) = pb.histogram_observations("minigpt5_time_per_output_token_seconds", model=label)
    assert 0 <= per_token * (usage["sampled_tokens"] - 1) <= e2e
    (decode,) = pb.histogram_observations("minigpt5_image_decode_latency_seconds", model=label)
    assert 0 < decode <= e2e
    assert pb.histogram_observations("minigpt5_vision_latency_seconds", model=label) == []  # no input image
    kinds = pb.metric_families()
    assert kinds["minigpt5_inflight_requests"] == pb.MetricFamily.GAUGE
    assert kinds["minigpt5_requests_total"] == pb.MetricFamily.COUNTER


def test_bls_non_streaming_gives_one_complete_response_equal_to_the_stream(pb, make_bls, configs, streamed):
    bls = make_bls("minigpt5_units_complete")
    request = public_request(configs, "units-complete", stream=False, **STORY)
    bls.execute([request])
    sender = request.get_response_sender()
    sent = sender.wait_final(WAIT_S)
    assert len(sent) == 1 and sent[0][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    (complete,) = public_events(sender, configs["minigpt5"])
    assert complete["event_type"] == ["complete"] and complete["sequence_index"] == [0]

    events = streamed.events  # same seed: same text, same image
    kinds = [e["event_type"][0] for e in events]
    assert complete["text_output"][0] == "".join(e["text_output"][0] for e in events)
    image = events[kinds.index("image")]
    assert complete["image_offset"] == image["image_offset"]
    assert len(complete["image_output"]) == 1
    diff = np.abs(png_pixels(complete["image_output"][0]).astype(int) - png_pixels(image["image_output"][0])).max()
    assert diff <= BATCHED_IMAGE_TOLERANCE
    assert complete["finish_reason"] == events[-1]["finish_reason"]
    usage, streamed_usage = json.loads(complete["usage"][0]), json.loads(events[-1]["usage"][0])
    # the same prompt again: its whole blocks come from the decoder's prefix cache, the answer is the same
    assert usage.pop("cached_prompt_positions") > 0 and "cached_prompt_positions" in streamed_usage
    streamed_usage.pop("cached_prompt_positions")
    assert usage == streamed_usage


def _chat_turn(pb, bls, configs, request_id: str, **params) -> dict:
    request = public_request(configs, request_id, stream=False, temperature=0.0, max_tokens=12, max_images=0, **params)
    bls.execute([request])
    sender = request.get_response_sender()
    sender.wait_final(WAIT_S)
    (complete,) = public_events(sender, configs["minigpt5"])
    return {"text": complete["text_output"][0], "usage": json.loads(complete["usage"][0])}


def test_a_chat_turn_reuses_embeddings_and_the_prompt_prefix_with_the_same_answer(
    pb, make_bls, configs, reference_pipeline, reference_engine
):
    """Turn 2 sends turn 1's image again: it skips vision_encoder (embedding cache), the decoder copies
    turn 1's prompt blocks (prefix cache), and the answer equals the one computed without any cache."""
    bls, label, decoder_label = make_bls("minigpt5_units_cache"), "minigpt5_units_cache", "vicuna_decoder_units"
    pictures = np.random.default_rng(11).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    vision_before = len(pb.calls_to("vision_encoder"))
    saved_before = _metric("minigpt5_prefix_cache_saved_positions_total", decoder_label)
    first = _chat_turn(pb, bls, configs, "units-chat-1", text_input="What is in this picture?", images=pictures[:1])
    history = [
        {"role": "human", "text": "What is in this picture?", "num_images": 1},
        {"role": "assistant", "text": first["text"]},
    ]
    second = _chat_turn(
        pb, bls, configs, "units-chat-2", text_input="And in this one?", images=pictures, history=json.dumps(history)
    )

    vision_calls = pb.calls_to("vision_encoder")[vision_before:]
    assert [len(call.inputs["images"]) for call in vision_calls] == [1, 1]  # each distinct image once
    assert wait_until(
        lambda: (
            (
                _metric("minigpt5_image_embedding_cache_hits_total", label),
                _metric("minigpt5_image_embedding_cache_misses_total", label),
            )
            == (1, 2)
        )
    )
    assert _metric("minigpt5_image_embedding_cache_entries", label) == 2
    assert _metric("minigpt5_image_embedding_cache_bytes", label) == 2 * 32 * 64 * 4  # float32 [32, 64] each
    cached = second["usage"]["cached_prompt_positions"]
    assert cached >= 32 and first["usage"]["cached_prompt_positions"] < cached  # at least turn 1's image
    assert wait_until(
        lambda: (
            _metric("minigpt5_prefix_cache_saved_positions_total", decoder_label) - saved_before
            == first["usage"]["cached_prompt_positions"] + cached
        )
    )
    assert _metric("minigpt5_prefix_cache_hits_total", decoder_label) >= cached // 16
    assert _metric("minigpt5_prefix_cache_blocks", decoder_label) > 0
    assert _metric("minigpt5_prefix_cache_bytes", decoder_label) > 0
    assert _metric("minigpt5_prefill_positions_total", decoder_label) > 0

    pipe = reference_pipeline  # the same turn without any cache, in this thread
    request = pipe.request(
        "And in this one?", pictures, parse_history(json.dumps(history)), max_tokens=12, temperature=0.0, max_images=0
    )
    engine = reference_engine.engine
    engine.submit(
        reference_engine.make_request(
            "units-chat-alone", pipe.prompts.prompt_ids(request), pipe.vision.encode(pictures), request.sampling
        )
    )
    text = ""
    while engine.has_work:
        text += "".join(e.text for e in engine.step() if isinstance(e, TextDelta))
    assert second["text"] == text


INVALID = {
    "temperature": {"temperature": -1.0},
    "text_input": {"text_input": ""},
    "image_bytes": {"image_bytes": [b"this is not base64 of an image!"]},
    "images": {"images": np.zeros((9, 224, 224, 3), dtype=np.uint8)},
    "history": {"history": '[{"role": "human", "text": "hi"'},  # malformed JSON
    "history-role": {"history": '[{"role": "robot", "text": "hi"}]'},  # valid JSON, bad turn
}


@pytest.mark.parametrize("case", list(INVALID))
def test_bls_invalid_input_gets_one_final_invalid_arg_naming_the_field(pb, bls, configs, case):
    label = "minigpt5_units"
    invalid_before = _metric("minigpt5_requests_total", label, outcome="invalid")
    params = {"text_input": "Hello there.", "max_tokens": 8, "random_seed": 1, **INVALID[case]}
    request = public_request(configs, f"units-invalid-{case}", **params)
    bls.execute([request])
    field = case.split("-")[0]
    assert_one_final_error(request.get_response_sender(), pb.TritonError.INVALID_ARG, field)
    # counted before the error is handed to the writer, so already done once the FINAL arrived
    assert _metric("minigpt5_requests_total", label, outcome="invalid") == invalid_before + 1


@pytest.mark.parametrize("key", ["kv_preallocate", "decode_cuda_graphs"])
def test_gpu_default_switches(serving, key):
    from minigpt5 import placement

    def choose(setting, device):
        return placement.on_gpu_by_default({key: setting}, key, device)

    assert (choose("auto", "cpu"), choose("auto", "cuda:0"), choose("true", "cpu"), choose("false", "cuda:0")) == (
        False,
        True,
        True,
        False,
    )
    assert placement.on_gpu_by_default({}, key, "cuda:0")  # absent = auto
    with pytest.raises(ValueError, match=key):
        choose("yes", "cpu")


def test_bls_refuses_beyond_max_inflight_with_unavailable(pb, make_bls, configs):
    label = "minigpt5_units_overload"
    bls = make_bls(label, max_inflight_requests=1)
    params = {"text_input": "Hello there.", "max_tokens": 6, "random_seed": 2, "num_inference_steps": 1}
    first, second = (public_request(configs, f"units-busy-{i}", **params) for i in (1, 2))
    bls.execute([first, second])
    assert_one_final_error(second.get_response_sender(), pb.TritonError.UNAVAILABLE, "max_inflight_requests")
    first.get_response_sender().wait_final(WAIT_S)
    (complete,) = public_events(first.get_response_sender(), configs["minigpt5"])
    assert complete["event_type"] == ["complete"]
    assert wait_until(lambda: _metric("minigpt5_inflight_requests", label) == 0)
    assert _metric("minigpt5_requests_total", label, outcome="overloaded") == 1
    assert _metric("minigpt5_requests_total", label, outcome="ok") == 1
    third = public_request(configs, "units-busy-3", **params)  # the slot is free again
    bls.execute([third])
    third.get_response_sender().wait_final(WAIT_S)
    assert public_events(third.get_response_sender(), configs["minigpt5"])[0]["event_type"] == ["complete"]


# ---- client cancellation --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cancelled_run(pb, serving, make_bls, configs, engine):
    """A long streaming request whose client goes away after its first text event."""
    label = "minigpt5_units_cancel"
    bls = make_bls(label)
    aborted = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving.minigpt5_model, "CANCEL_CHECK_S", 0.0)  # check at every decoder event
        real_abort = engine.abort
        mp.setattr(engine, "abort", lambda request_id: (aborted.append(request_id), real_abort(request_id)))
        request = public_request(
            configs,
            "units-cancel",
            text_input="Tell me a very long story.",
            stream=True,
            random_seed=3,
            num_inference_steps=1,
            **LONG,
        )
        sender = request.get_response_sender()
        sender.cancel_when(lambda s: len(s.sent) >= 1)  # the client is gone once it got something
        bls.execute([request])
        assert wait_until(lambda: _metric("minigpt5_inflight_requests", label) == 0), "request never ended"
        assert wait_until(lambda: not engine.has_work), "the decoder row was not freed"
    return types.SimpleNamespace(sender=sender, aborted=aborted, label=label, bls=bls)


def test_client_cancel_aborts_the_decoder_and_sends_no_image(pb, configs, cancelled_run, engine):
    (request_id,) = cancelled_run.aborted
    assert request_id.startswith("minigpt5-")
    assert engine.kv_positions_in_use == 0
    kinds = [values(r)["event_type"][0] for r in cancelled_run.sender.responses]
    assert "text" in kinds and "image_start" not in kinds and "image" not in kinds and "final" not in kinds
    assert _metric("minigpt5_requests_total", cancelled_run.label, outcome="cancelled") == 1
    assert _metric("minigpt5_requests_total", cancelled_run.label, outcome="ok") == 0


def test_cancelled_request_still_ends_its_stream_with_the_final_flag(pb, cancelled_run):
    """python_backend README (decoupled mode): "Sending the TRITONSERVER_RESPONSE_COMPLETE_FINAL flag
    at the end of response is still needed even the request is cancelled." Without it Triton never
    releases the request."""
    sender = cancelled_run.sender
    assert sender.wait_for(lambda s: s.final_count == 1, timeout=2.0), (
        f"the cancelled request never got the FINAL flag; sent {len(sender.sent)} responses, all non-final"
    )


def test_cancel_after_image_start_sends_no_image(pb, serving, make_bls, configs):
    """The client goes away between `image_start` and the image: the image must not be sent."""
    label = "minigpt5_units_cancel_image"
    bls = make_bls(label)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving.minigpt5_model, "CANCEL_CHECK_S", 0.0)
        # max_tokens=8 with force_image: the first token is [IMG0], so the decoder sends the voken
        # states, then its Finished; the client is gone at the second check.
        request = public_request(
            configs,
            "units-cancel-image",
            text_input="Draw a kite.",
            stream=True,
            force_image=True,
            max_tokens=8,
            random_seed=4,
            num_inference_steps=3,
        )
        sender = request.get_response_sender()
        sender.cancel_when(lambda s: s.is_cancelled_calls >= 2)
        calls_before = len(pb.calls_to("image_decoder"))
        bls.execute([request])
        assert wait_until(lambda: _metric("minigpt5_inflight_requests", label) == 0), "request never ended"
    assert _metric("minigpt5_requests_total", label, outcome="cancelled") == 1
    # let the image decoding queued before the cancel finish, plus time to PNG-encode and send it
    wait_until(lambda: all(c.done.is_set() for c in pb.calls_to("image_decoder")[calls_before:]), timeout=WAIT_S)
    time.sleep(0.5)
    kinds = [values(r)["event_type"][0] for r in sender.responses]
    assert "image" not in kinds, f"an image was sent after the client went away: {kinds}"


def test_cancel_while_the_image_is_decoded_ends_the_request_at_once(pb, make_bls, configs):
    """The decoder has finished and the request waits for its (slow) image: a client that goes away
    then is still noticed within a check, not when the image is done."""
    label = "minigpt5_units_cancel_wait"
    bls = make_bls(label)
    request = public_request(
        configs,
        "units-cancel-wait",
        text_input="Draw a kite.",
        stream=True,
        force_image=True,
        max_tokens=2,
        random_seed=4,
        num_inference_steps=200,
    )
    sender = request.get_response_sender()
    started = time.monotonic()
    sender.cancel_when(lambda s: time.monotonic() - started > 0.3)  # the 2-token text is long done by then
    calls_before = len(pb.calls_to("image_decoder"))
    bls.execute([request])
    assert wait_until(lambda: _metric("minigpt5_inflight_requests", label) == 0), "request never ended"
    image_calls = pb.calls_to("image_decoder")[calls_before:]
    assert image_calls and not image_calls[0].done.is_set(), "the request waited for its image to finish"
    assert _metric("minigpt5_requests_total", label, outcome="cancelled") == 1
    wait_until(lambda: all(c.done.is_set() for c in image_calls), timeout=WAIT_S)
    time.sleep(0.3)
    assert "image" not in [values(r)["event_type"][0] for r in sender.responses]


def test_bls_finalize_returns_promptly_and_leaves_no_threads(pb, serving, make_args, configs, children):
    names = (
        "minigpt5-responses",
        "minigpt5-vision",
        "minigpt5-images",
        "minigpt5-req",
        "minigpt5-png",
        "minigpt5-decoder-link",
        "minigpt5-request-metrics",
    )
    before = set(threading.enumerate())
    model = serving.minigpt5_model.MiniGPT5Model(
        make_args("minigpt5"), metrics=serving.metrics.PublicModelMetrics("minigpt5_units_unload")
    )
    request = public_request(
        configs, "units-unload-bls", text_input="Hi.", max_tokens=4, random_seed=5, num_inference_steps=1
    )
    model.execute([request])
    request.get_response_sender().wait_final(WAIT_S)
    assert wait_until(lambda: _metric("minigpt5_inflight_requests", "minigpt5_units_unload") == 0)
    started = time.monotonic()
    model.finalize()
    assert time.monotonic() - started < 5.0
    assert wait_until(lambda: not new_threads(before, *names), timeout=5.0), new_threads(before, *names)


# ================================== model_repository/*/1/model.py =================================
def _load_model_py(name: str):
    path = REPOSITORY / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"_model_repository_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Spy:
    """Wraps a bound method: records calls, forwards them, remembers what came back."""

    def __init__(self, method):
        self.method = method
        self.calls = []
        self.returned = []

    def __call__(self, *args):
        self.calls.append(args)
        result = self.method(*args)
        self.returned.append(result)
        return result


def _model_py_requests(name: str, configs, hidden):
    config = configs[name]
    if name == "vision_encoder":
        return [fake_pb_utils.make_request({"images": np.zeros((2, 224, 224, 3), np.uint8)}, config=config)]
    if name == "image_decoder":
        return [_image_request(config, np.zeros((1, 8, hidden), np.float32), [1], [7.5], [1], [0])]
    if name == "vicuna_decoder":  # a link call with nothing to do: empty events after link_wait_ms
        return [
            fake_pb_utils.make_request(
                {"link_id": ["units-link"], "commands": ['{"submit": [], "abort": []}']}, config=config
            )
        ]
    return [public_request(configs, "units-model-py", text_input=" ")]  # refused at once: INVALID_ARG


@pytest.mark.parametrize("name", MODEL_DIRS)
def test_model_py_delegates_to_the_serving_class(pb, serving, make_args, configs, hidden, children, name):
    expected = {
        "vision_encoder": serving.vision_encoder_model.VisionEncoder,
        "image_decoder": serving.image_decoder_model.ImageDecoderModel,
        "vicuna_decoder": serving.vicuna_decoder_model.VicunaDecoderModel,
        "minigpt5": serving.minigpt5_model.MiniGPT5Model,
    }[name]
    module = _load_model_py(name)
    before = set(threading.enumerate())
    triton_model = module.TritonPythonModel()
    args = make_args(name, **({"kv_cache_budget_tokens": DECODER_BUDGET} if name == "vicuna_decoder" else {}))
    triton_model.initialize(args)
    assert type(triton_model.model) is expected
    try:
        spy = triton_model.model.execute = _Spy(triton_model.model.execute)
        requests = _model_py_requests(name, configs, hidden)
        result = triton_model.execute(requests)
        assert spy.calls == [(requests,)] and result is spy.returned[0]
        if configs[name]["decoupled"]:
            assert result is None
            sent = requests[0].get_response_sender().wait_final(WAIT_S)
            if name == "minigpt5":
                assert len(sent) == 1 and sent[0][0].error().code() == pb.TritonError.INVALID_ARG
            else:
                assert values(sent[-1][0])["finish_reason"][0] in ("stop", "length")
        else:
            assert len(result) == 1 and not result[0].has_error()
            assert pb.check_outputs(configs[name], result[0]) is None
    finally:
        if hasattr(module.TritonPythonModel, "finalize"):
            finalize = triton_model.model.finalize = _Spy(triton_model.model.finalize)
            triton_model.finalize()
            assert finalize.calls == [()]
            left = lambda: new_threads(before, "minigpt5-")  # noqa: E731
            assert wait_until(lambda: not left(), timeout=5.0), left()
    if name in ("minigpt5", "vicuna_decoder"):  # the models that own threads have finalize
        assert hasattr(module.TritonPythonModel, "finalize")


# ---- drain before shutdown (minigpt5/launcher/drain.py) ----------------------------------------------
class _MetricsEndpoint:
    """A real HTTP /metrics endpoint whose minigpt5_inflight_requests follows `counts`, one per scrape."""

    def __init__(self, counts):
        import http.server

        counts = list(counts)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                count = counts.pop(0) if len(counts) > 1 else counts[0]
                body = (
                    f'nv_inference_count{{model="minigpt5"}} 3\n'
                    f'minigpt5_inflight_requests{{model="minigpt5"}} {count}\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def close(self):
        self.server.shutdown()


def test_drain_waits_until_nothing_is_in_flight_and_reports(monkeypatch):
    from minigpt5.launcher import drain

    monkeypatch.setattr(drain, "POLL_S", 0.01)
    monkeypatch.setattr(drain, "SETTLE_S", 0.0)
    endpoint, lines = _MetricsEndpoint([2, 2, 1, 0]), []
    try:
        assert drain.wait_drained(endpoint.url, time.monotonic() + 30, lines.append)
        assert drain.inflight_requests(endpoint.url) == 0
    finally:
        endpoint.close()
    assert lines and "draining: 2 request(s) in flight" in lines[0]


def test_drain_gives_up_at_the_deadline_and_without_metrics(monkeypatch):
    from minigpt5.launcher import drain

    monkeypatch.setattr(drain, "POLL_S", 0.01)
    endpoint, lines = _MetricsEndpoint([1]), []
    try:
        assert not drain.wait_drained(endpoint.url, time.monotonic() + 0.2, lines.append)
    finally:
        endpoint.close()
    assert "still in flight at the exit timeout" in lines[-1]
    from minigpt5.launcher.local import free_port

    refused = f"http://127.0.0.1:{free_port()}/metrics"
    assert drain.inflight_requests(refused) is None
    assert not drain.wait_drained(refused, time.monotonic() + 30, lines.append)
    assert "cannot read" in lines[-1]


def test_the_shutdown_flag_is_a_file_in_the_served_model_directory(tmp_path):
    from minigpt5.launcher import contract

    flag = contract.ShutdownFlag(tmp_path)
    assert not flag.raised() and not contract.ShutdownFlag(None).raised()
    contract.request_shutdown(tmp_path)
    assert flag.raised()
