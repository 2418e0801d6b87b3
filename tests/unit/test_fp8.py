"""fp8 (e4m3) decoder-layer weights: Fp8Linear against nn.Linear, the model swap, the decode engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt5.engine import Finished, VokenStates
from minigpt5.fp8 import Fp8Linear, fp8_available, quantize_llm_fp8
from minigpt5.sampling import SamplingParams

# e4m3 keeps 3 mantissa bits: ~2-3% rounding per weight and per activation, averaged over each dot
# product; measured ~0.035 of the output norm on random data.
RELATIVE_ERROR = 0.08
DTYPES = [torch.float32, torch.bfloat16]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def _tiny_llm(dtype=torch.float32, vocab_size=256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def _last_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return llm(ids).logits[:, -1].float()


def test_fp8_runs_on_the_cpu():
    assert fp8_available("cpu")[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_linear_is_quantized_and_close_to_the_float_linear(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=True).to(dtype)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.element_size() == 1
    assert not any(p.requires_grad for p in fp8.parameters())
    assert (fp8.in_features, fp8.out_features) == (256, 128) and fp8.bias.dtype == dtype
    x = torch.randn(3, 5, 256).to(dtype)  # leading dims [B, W, in]
    with torch.inference_mode():
        got, expected = fp8(x), linear(x)
    assert got.shape == (3, 5, 128) and got.dtype == dtype
    assert 1e-3 < _relative_error(got, expected) < RELATIVE_ERROR  # close, but really quantized


def test_a_row_of_zeros_gives_the_bias_not_nan():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    x[1] = 0
    with torch.inference_mode():
        out = Fp8Linear.from_linear(linear)(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], linear.bias.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_llm_replaces_the_decoder_linears_only(dtype):
    llm = _tiny_llm(dtype)
    reference = _tiny_llm(dtype)
    linears = [m for layer in llm.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    embeddings, lm_head = llm.model.embed_tokens, llm.lm_head
    stats = quantize_llm_fp8(llm)

    assert stats["quantized_linears"] == len(linears) == 2 * 7 and stats["skipped_linears"] == 0
    for layer in llm.model.layers:
        assert not any(isinstance(m, nn.Linear) for m in layer.modules())
        for proj in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ):
            assert isinstance(proj, Fp8Linear)
    assert llm.lm_head is lm_head and llm.model.embed_tokens is embeddings
    assert lm_head.weight.dtype == embeddings.weight.dtype == dtype and llm.dtype == dtype
    weights = sum(m.weight.numel() for m in linears)
    scales = sum(m.out_features for m in linears)  # one float32 per output channel
    assert stats["weight_bytes_before"] == weights * torch.empty(0, dtype=dtype).element_size()
    assert stats["weight_bytes_after"] == weights + 4 * scales

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    quantized, exact = _last_logits(llm, ids), _last_logits(reference, ids)
    assert torch.isfinite(quantized).all()
    assert torch.cosine_similarity(quantized, exact, dim=-1).min() > 0.99


def test_a_layer_not_divisible_by_16_is_skipped():
    llm = _tiny_llm()
    llm.model.layers[0].mlp.down_proj = nn.Linear(128, 64 + 8, bias=False)
    stats = quantize_llm_fp8(llm)
    assert (stats["quantized_linears"], stats["skipped_linears"]) == (13, 1)
    assert isinstance(llm.model.layers[0].mlp.down_proj, nn.Linear)


def test_the_served_decoder_loads_fp8_and_decodes_at_static_shapes(tiny_weights):
    """DecoderStage.load as the server calls it (llm_quantization fp8, decode_cuda_graphs true: the
    static step eagerly on the CPU): a greedy request with an image runs to the end."""
    from minigpt5.stages import DecoderStage, PromptBuilder
    from minigpt5.weights.layout import WeightsDir

    weights = WeightsDir(tiny_weights)
    decoder = DecoderStage.load(weights, quantization="fp8", static_decode=True, max_rows=4)
    assert all(isinstance(layer.self_attn.q_proj, Fp8Linear) for layer in decoder.llm.model.layers)
    prompt = PromptBuilder(weights).tokenizer.encode("A cat sits on a red sofa.")
    params = SamplingParams(max_tokens=16, temperature=0.0, force_image=True)
    decoder.engine.submit(decoder.make_request("r0", prompt, None, params))
    events = []
    while decoder.engine.has_work:
        events += decoder.engine.step()
    finished = [e for e in events if isinstance(e, Finished)]
    states = [e.states for e in events if isinstance(e, VokenStates)]
    assert len(finished) == 1 and finished[0].token_ids and finished[0].reason in ("stop", "length")
    assert len(states) == 1 and states[0].shape[0] == 8 and torch.isfinite(states[0]).all()


def test_an_unknown_quantization_names_the_parameter(tiny_weights):
    from minigpt5.stages import DecoderStage
    from minigpt5.weights.layout import WeightsDir

    with pytest.raises(ValueError, match="llm_quantization"):
        DecoderStage.load(WeightsDir(tiny_weights), quantization="int4")
