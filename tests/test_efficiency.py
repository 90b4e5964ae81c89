"""Analytic cost model: formulas, known checkpoints, cross-check with torch's FLOP counter."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from globalcom2 import efficiency as eff


def test_paper_claim_flops_at_ten_percent():
    # The paper: compressing 90% of the visual tokens reduces FLOPs to 9.1%.
    rows = eff.analyze(eff.KNOWN_MODELS["llava-hf/llava-v1.6-vicuna-7b-hf"], [1.0, 0.1])
    assert rows[0].visual_tokens == 2880 and rows[1].visual_tokens == 288
    assert round(rows[1].relative_tflops, 3) == 0.091


def test_flops_formula_by_hand():
    arch = eff.LMArch("toy", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4,
                      intermediate_size=16, vocab_size=10)
    L = 5
    linear = L * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16)  # q, k, v, o, gate/up/down MACs
    attention = 2 * 2 * L * L * 4  # QK^T and AV, 2 heads
    head = 2 * 8 * 10  # LM head on the last position
    assert eff.prefill_flops(arch, L, matmul_only=True) == 2 * 2 * (linear + attention) + head
    # LLM-Viewer also counts, per block: softmax 5 per score, 2 norms x 7 per value, 2 adds x 1,
    # the activation 2 per hidden value.
    others = 5 * 2 * L * L + 2 * 7 * L * 8 + 2 * L * 8 + 2 * L * 8
    assert eff.prefill_flops(arch, L) == 2 * (2 * (linear + attention) + others) + head
    assert eff.prefill_flops(arch, L, lm_head=False) == 2 * (2 * (linear + attention) + others)


def test_kv_cache_uses_kv_heads():
    mistral = eff.KNOWN_MODELS["llava-hf/llava-v1.6-mistral-7b-hf"]
    vicuna = eff.KNOWN_MODELS["llava-hf/llava-v1.6-vicuna-7b-hf"]
    assert eff.kv_cache_bytes(vicuna, 1) == 2 * 32 * 32 * 128 * 2
    assert eff.kv_cache_bytes(mistral, 1) * 4 == eff.kv_cache_bytes(vicuna, 1)  # GQA 8 of 32 heads


def _tiny_text_model(config_kwargs):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=64, max_position_embeddings=512, **config_kwargs)
    # Eager attention: its QK^T and AV are plain matmuls the counter sees (CPU SDPA kernels are not counted).
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cfg, LlamaModel(cfg).eval()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_analytic_flops_match_torch_flop_counter(kv_heads):
    cfg, model = _tiny_text_model(dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kv_heads))
    arch = eff.LMArch.from_text_config(cfg)
    assert arch.gated_mlp and arch.num_kv_heads == kv_heads
    L = 96
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(inputs_embeds=torch.randn(1, L, 64))
    measured = counter.get_total_flops()
    # The counter sees only matrix multiplies (not norms, softmax, adds, SiLU), and no LM head here;
    # it also sees the rotary embedding's small matmul. Everything else is the same formula.
    predicted = eff.prefill_flops(arch, L, lm_head=False, matmul_only=True)
    assert abs(measured - predicted) / predicted < 0.01


def test_resolve_arch_from_local_config(tmp_path):
    from globalcom2.tiny import build_tiny_llava_next

    model, _ = build_tiny_llava_next()
    model.config.save_pretrained(tmp_path)
    arch = eff.resolve_arch(str(tmp_path))
    t = model.config.text_config
    assert (arch.num_layers, arch.hidden_size, arch.num_kv_heads, arch.intermediate_size, arch.vocab_size) == (
        t.num_hidden_layers, t.hidden_size, t.num_key_value_heads, t.intermediate_size, t.vocab_size)
    assert eff.resolve_arch(str(tmp_path / "config.json")) == arch


def test_resolve_arch_errors(tmp_path, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ValueError, match="known offline"):
        eff.resolve_arch("nobody/no-such-model")
    with pytest.raises(ValueError, match="config.json"):
        eff.resolve_arch(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        eff.resolve_arch(str(bad))


def test_roofline_prefill_is_compute_bound_and_decode_memory_bound():
    arch = eff.KNOWN_MODELS["llava-hf/llava-v1.6-vicuna-7b-hf"]
    hw = eff.HARDWARE["H100"]
    prefill = eff.prefill_seconds(arch, 2880, hw)
    compute = eff.prefill_flops(arch, 2880) / hw.peak_flops
    # Mostly compute bound; without flash attention the score matrix's traffic (qk_matmul writes it,
    # softmax reads and writes it, sv_matmul reads it) adds about half again on an H100.
    assert compute <= prefill <= 1.6 * compute
    flash = eff.prefill_seconds(arch, 2880, hw, flash_attention=True)
    assert compute <= flash <= 1.3 * compute and flash < prefill
    weights = arch.num_layers * (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2
    assert eff.decode_seconds(arch, 720, hw) > weights / hw.bandwidth
    assert eff.decode_seconds(arch, 2880, hw) > eff.decode_seconds(arch, 720, hw)
    assert eff.prefill_seconds(arch, 720, eff.HARDWARE["H200"]) <= eff.prefill_seconds(arch, 720, eff.HARDWARE["A100-40GB"])


def test_rows_render_in_every_format():
    rows = [r.to_dict() for r in eff.analyze(eff.KNOWN_MODELS["llava-hf/llava-v1.6-34b-hf"], [1, 0.25], text_tokens=40)]
    data = json.loads(eff.format_rows(rows, eff.EFFICIENCY_COLUMNS, "json"))
    assert {"ratio", "visual_tokens", "prefill_tflops", "kv_cache_mib", "prefill_ms", "decode_ms_per_token"} <= set(data[0])
    assert data[1]["visual_tokens"] == 720 and data[1]["text_tokens"] == 40
    csv = eff.format_rows(rows, eff.EFFICIENCY_COLUMNS, "csv").splitlines()
    assert csv[0].startswith("ratio,visual_tokens") and len(csv) == 3
    table = eff.format_rows(rows, eff.EFFICIENCY_COLUMNS, "table").splitlines()
    assert table[0].startswith("| ") and set(table[1]) <= set("|-:") and len(table) == 4


@pytest.mark.parametrize("text, message", [("1,x", "not a number"), ("0", "not in"), ("1.5", "not in")])
def test_parse_ratios_errors(text, message):
    with pytest.raises(ValueError, match=message):
        eff.parse_ratios(text)


def test_unknown_hardware():
    with pytest.raises(ValueError, match="H100"):
        eff.resolve_hardware("TPU")
    assert eff.resolve_hardware("h200").name == "H200"


def test_vocab_size_matters_for_decode_time_only():
    small = eff.KNOWN_MODELS["llava-hf/llava-v1.6-mistral-7b-hf"]
    big_vocab = eff.KNOWN_MODELS["llava-hf/llama3-llava-next-8b-hf"]  # same blocks, 4x the vocabulary
    hw = eff.HARDWARE["A100-80GB"]
    assert eff.prefill_flops(small, 720, lm_head=False) == eff.prefill_flops(big_vocab, 720, lm_head=False)
    # The LM head on the last position is in the prefill total (LLM-Viewer's), 2 FLOPs per weight.
    assert eff.prefill_flops(big_vocab, 720) - eff.prefill_flops(small, 720) == 2 * 4096 * (128320 - 32064)
    extra = (big_vocab.vocab_size - small.vocab_size) * 4096 * 2 / hw.bandwidth
    assert eff.decode_seconds(big_vocab, 720, hw) - eff.decode_seconds(small, 720, hw) == pytest.approx(extra, rel=0.01)


def test_fastv_costs_the_first_k_layers_at_full_length():
    arch = eff.resolve_arch("llava-hf/llava-v1.6-vicuna-7b-hf")
    plain = eff.analyze(arch, [1.0, 0.25], text_tokens=10)
    fastv = eff.analyze(arch, [1.0, 0.25], text_tokens=10, fastv_layer=2)
    assert fastv[0] == plain[0]  # R = 1: nothing is pruned anywhere
    L, full, kept = arch.num_layers, 2880 + 10, 720 + 10
    per_layer = lambda n: eff.prefill_flops(arch, n) / L  # noqa: E731
    assert fastv[1].prefill_tflops * 1e12 == pytest.approx(2 * per_layer(full) + (L - 2) * per_layer(kept))
    assert fastv[1].kv_cache_mib == pytest.approx((2 * full + (L - 2) * kept) / L * plain[0].kv_cache_mib / full)
    assert plain[1].prefill_tflops < fastv[1].prefill_tflops < plain[0].prefill_tflops
    assert plain[1].prefill_ms < fastv[1].prefill_ms < plain[0].prefill_ms
    with pytest.raises(ValueError, match="fastv_layer"):
        eff.analyze(arch, [0.5], fastv_layer=L)
