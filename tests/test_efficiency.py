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


# ------------------------------------------------------------------------------------------------
# Operator by operator, against LLM-Viewer's formulas written out here (model_analyzer.py)
# ------------------------------------------------------------------------------------------------

TOY = eff.LMArch("toy", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4,
                 intermediate_size=16, vocab_size=10)


def _by_name(ops):
    out = {op.name: (op.flops, op.bytes) for op in ops}
    assert len(out) == len(ops)
    return out


def _expected_block(t, c, b, flash, block_rows=4, gated=True):
    """One block of TOY: d=8, 2 heads (1 KV head) of 4, MLP 16; t queries, c keys, b bytes per value."""
    d, h, kvh, hd, i = 8, 2, 1, 4, 16
    lin = lambda din, dout: (2 * t * din * dout, b * (din * dout + t * din + t * dout))  # noqa: E731
    norm = (7 * t * d, b * (t * d + t * d))
    add = (t * d, b * (t * d + t * d))
    ops = {"attn_norm": norm, "q_proj": lin(d, h * hd), "k_proj": lin(d, kvh * hd), "v_proj": lin(d, kvh * hd)}
    if flash:
        n_blocks = -(-t // block_rows)
        ops["fused_attention"] = (
            2 * h * t * c * hd * 2 + 5 * h * t * c,
            b * (t * h * hd + 2 * t * h * hd + n_blocks * c * hd * h * 2),  # Q in; O initialised and saved; K, V per block
        )
    else:
        ops["qk_matmul"] = (2 * h * t * c * hd, b * (t * h * hd + c * kvh * hd + h * t * c))
        ops["softmax"] = (5 * h * t * c, b * (h * t * c + h * t * c))
        ops["sv_matmul"] = (2 * h * t * c * hd, b * (h * t * c + c * kvh * hd + t * h * hd))
    ops.update({"o_proj": lin(h * hd, d), "attn_add": add, "mlp_norm": norm})
    if gated:
        ops["gate_proj"] = lin(d, i)
    ops.update({"up_proj": lin(d, i), "mlp_act": (2 * t * d, b * (2 * t * d + t * d)), "down_proj": lin(i, d),
                "mlp_add": add})
    return ops


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("t, c", [(5, 5), (1, 7)])  # prefill over 5 tokens; a decode step on 7 cached
def test_every_operator_by_hand(flash, t, c):
    ops = eff.block_ops(TOY, t, c, 2.0, flash_attention=flash)
    assert _by_name(ops) == _expected_block(t, c, 2, flash)
    assert list(_by_name(ops)) == list(_expected_block(t, c, 2, flash))  # LLM-Viewer's graph order
    fp32 = eff.block_ops(TOY, t, c, 4.0, flash_attention=flash)
    assert _by_name(fp32) == _expected_block(t, c, 4, flash)
    # Matmul FLOPs: the linear layers and the two attention products, nothing else.
    matmul = sum(op.matmul_flops for op in ops)
    assert matmul == 2 * t * (8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16) + 2 * 2 * 2 * t * c * 4


def test_plain_mlp_has_no_gate():
    plain = eff.LMArch(**{**TOY.__dict__, "gated_mlp": False})
    assert _by_name(eff.block_ops(plain, 5, 5)) == _expected_block(5, 5, 2, False, gated=False)


def test_flash_attention_query_blocks_follow_the_on_chip_buffer():
    # B_r = min(ceil(buffer / (b * hd)), hd): 16 bytes / (2 * 4) -> 2 rows, so 5 queries take 3 blocks.
    small = eff.Hardware("small", 1.0, 1.0, onchip_buffer_bytes=16)
    ops = _by_name(eff.block_ops(TOY, 5, 5, flash_attention=True, hardware=small))
    assert ops["fused_attention"] == _expected_block(5, 5, 2, True, block_rows=2)["fused_attention"]
    # A real card's buffer gives blocks of head_dim rows, as with no hardware given.
    a100 = _by_name(eff.block_ops(TOY, 5, 5, flash_attention=True, hardware="A100-80GB"))
    assert a100["fused_attention"] == _expected_block(5, 5, 2, True, block_rows=4)["fused_attention"]


def test_lm_head_by_hand():
    head = eff.lm_head_op(TOY)
    assert (head.name, head.flops, head.bytes, head.matmul_flops) == ("lm_head", 2 * 8 * 10, 2 * (8 * 10 + 8 + 10), 160)


def test_prefill_and_decode_times_are_sums_of_operator_rooflines():
    hw = eff.Hardware("toy-hw", peak_tflops=1e-9, bandwidth_gbs=1e-6)  # 1000 FLOP/s, 1000 B/s
    roof = lambda f, by: max(f / 1e3, by / 1e3)  # noqa: E731
    head = roof(2 * 8 * 10, 2 * (8 * 10 + 8 + 10))
    for flash in (False, True):
        pre = sum(roof(*v) for v in _expected_block(5, 5, 2, flash).values())
        assert eff.prefill_seconds(TOY, 5, hw, flash_attention=flash) == pytest.approx(2 * pre + head)
        dec = sum(roof(*v) for v in _expected_block(1, 7, 2, flash).values())
        assert eff.decode_seconds(TOY, 7, hw, flash_attention=flash) == pytest.approx(2 * dec + head)


def test_flash_attention_changes_time_not_flops():
    arch = eff.KNOWN_MODELS["llava-hf/llava-v1.6-vicuna-7b-hf"]
    plain = eff.analyze(arch, [1.0, 0.25])
    flash = eff.analyze(arch, [1.0, 0.25], flash_attention=True)
    for p, f in zip(plain, flash):
        assert f.prefill_tflops == p.prefill_tflops and f.kv_cache_mib == p.kv_cache_mib
        assert f.prefill_ms < p.prefill_ms and f.flash_attention and not p.flash_attention
    ops = {op.name for op in eff.block_ops(arch, 2880, 2880, flash_attention=True)}
    assert "fused_attention" in ops and not ops & {"qk_matmul", "softmax", "sv_matmul"}


def test_new_operators_add_15_percent_to_vicuna_prefill():
    # Norms, softmax, adds and the activation: all memory bound, ~13% of the 2,880-token prefill on
    # an A100-80GB (about 15% on top of the linear layers and attention matmuls alone).
    arch = eff.KNOWN_MODELS["llava-hf/llava-v1.6-vicuna-7b-hf"]
    rows = eff.operator_breakdown(arch, 2880, "A100-80GB")
    new = [r for r in rows if r.name in {"attn_norm", "mlp_norm", "softmax", "attn_add", "mlp_add", "mlp_act"}]
    assert len(new) == 6 and all(r.bound == "memory" for r in new)
    share = sum(r.share for r in new)
    assert 0.12 < share < 0.14 and 0.14 < share / (1 - share) < 0.17


def test_operator_breakdown_adds_up():
    arch = eff.KNOWN_MODELS["llava-hf/llava-v1.6-mistral-7b-hf"]
    hw = eff.HARDWARE["H100"]
    for stage, seconds in (("prefill", eff.prefill_seconds), ("decode", eff.decode_seconds)):
        for flash in (False, True):
            rows = eff.operator_breakdown(arch, 720, hw, stage=stage, flash_attention=flash)
            assert [r.scope for r in rows] == ["block"] * (len(rows) - 1) + ["lm_head"]
            assert {r.count for r in rows[:-1]} == {32} and rows[-1].count == 1
            assert sum(r.total_ms for r in rows) == pytest.approx(seconds(arch, 720, hw, flash_attention=flash) * 1e3)
            assert sum(r.share for r in rows) == pytest.approx(1.0)
            for r in rows:
                assert r.bound == ("memory" if r.flops / hw.peak_flops < r.bytes / hw.bandwidth else "compute")
                assert r.seconds == max(r.flops / hw.peak_flops, r.bytes / hw.bandwidth)
    prefill = {r.name: r for r in eff.operator_breakdown(arch, 2880, hw)}
    assert prefill["q_proj"].bound == "compute" and prefill["softmax"].bound == "memory"
    decode = eff.operator_breakdown(arch, 2880, hw, stage="decode")
    assert all(r.bound == "memory" for r in decode)
    table = eff.format_rows([r.to_dict() for r in prefill.values()], eff.BREAKDOWN_COLUMNS, "table").splitlines()
    assert len(table) == 2 + len(prefill) and "softmax" in table[7] and "memory" in table[7]
    with pytest.raises(ValueError, match="stage"):
        eff.operator_breakdown(arch, 10, hw, stage="train")


def test_hardware_figures_and_sources():
    hw = eff.HARDWARE
    assert (hw["A100-40GB"].bandwidth_gbs, hw["A100-80GB"].bandwidth_gbs) == (1555.0, 2039.0)
    assert hw["A100-40GB"].peak_tflops == hw["A100-80GB"].peak_tflops == 312.0
    assert (hw["H100"].peak_tflops, hw["H100"].bandwidth_gbs) == (1979 / 2, 3072.0)  # LLM-Viewer's SXM entry
    assert (hw["H200"].peak_tflops, hw["H200"].bandwidth_gbs) == (1979 / 2, 4800.0)
    for name, h in hw.items():
        assert h.source and h.onchip_buffer_bytes > 0
        assert ("LLM-Viewer" in h.source) == (name != "H200")
    assert "datasheet" in hw["H200"].source


def test_lm_head_flops_against_torch_flop_counter():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, max_position_embeddings=128, hidden_size=64, intermediate_size=176,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    arch = eff.LMArch.from_text_config(cfg)
    L = 64
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(0, 300, (1, L)), logits_to_keep=1)
    predicted = eff.prefill_flops(arch, L, matmul_only=True)  # the LM head on the last position included
    assert abs(counter.get_total_flops() - predicted) / predicted < 0.01
