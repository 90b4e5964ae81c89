"""Measured benchmark (`globalcom2 bench`) and analytic efficiency (`globalcom2 efficiency`) commands."""

import json
import time

import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2 import bench, measure
from globalcom2.cli import CLIError, main

from conftest import make_image


def test_run_bench_rows(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    globalcom2.apply(model, retention_ratio=0.5, layout="spatial")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0)
    assert [r.method for r in rows] == ["vanilla", "globalcom2 R=0.25"]
    vanilla, comp = rows
    n_img = int((inputs.input_ids == model.config.image_token_id).sum())
    assert vanilla.visual_tokens == n_img and comp.visual_tokens < n_img
    assert comp.tokens_x == pytest.approx(comp.visual_tokens / n_img)
    # The KV cache is measured from the real cache: 2 x layers x kv_heads x head_dim x 4 bytes per token.
    t = model.config.text_config
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 4
    prompt = inputs.input_ids.shape[1]
    assert vanilla.kv_cache_mib * measure.MIB == per_token * prompt
    assert comp.kv_cache_mib * measure.MIB == per_token * (prompt - n_img + comp.visual_tokens)
    assert vanilla.compress_ms == 0.0 and comp.compress_ms > 0
    assert all(r.prefill_ms > 0 and r.generate_ms > 0 and r.tokens_per_s > 0 and r.peak_mem_mib > 0 for r in rows)
    # The model is handed back as it was given: patched with its previous settings.
    assert globalcom2.get_config(model).retention_ratio == 0.5 and globalcom2.get_config(model).layout == "spatial"


def test_median_ms_excludes_warmup():
    calls = []
    ms, out = measure.median_ms(lambda: calls.append(1) or len(calls), torch.device("cpu"), runs=3, warmup=2)
    assert len(calls) == 5 and out == 5 and ms >= 0


def test_cache_bytes_walks_layers():
    class Layer:
        def __init__(self):
            self.keys = torch.zeros(1, 2, 3, 4)
            self.values = torch.zeros(1, 2, 3, 4)

    class Cache:
        layers = [Layer(), Layer()]

    assert measure.cache_bytes(Cache()) == 4 * 24 * 4
    assert measure.cache_bytes(None) == 0


def test_bench_cli_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    code = main(["bench", "--runs", "1", "--warmup", "0", "--max-new-tokens", "2", "--ratios", "0.25",
                 "--format", "json", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)
    assert [r["method"] for r in rows] == ["vanilla", "globalcom2 R=0.25"]
    for key in ("prefill_ms", "vision_ms", "compress_ms", "generate_ms", "tokens_per_s", "peak_mem_mib",
                "kv_cache_mib", "visual_tokens", "prefill_x", "kv_cache_x"):
        assert key in rows[1]
    with Image.open(plot) as im:
        assert im.width > 600 and im.height > 300


def test_bench_cli_table_with_two_images(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    make_image(300, 900).save(a)
    make_image(480, 640, seed=1).save(b)
    code = main(["bench", "--image", str(a), "--image", str(b), "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "1", "--ratios", "0.1"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert "random" in lines[0]
    assert lines[1].startswith("| ") and "vanilla" in lines[3] and "R=0.1" in lines[4]


@pytest.mark.parametrize(
    "args, message",
    [(["--ratios", "0"], "ratio"), (["--runs", "0"], "--runs"), (["--image", "/no/such.png"], "not found"),
     (["--plot", "/no/such/dir/x.png"], "does not exist"), (["--batch-size", "0"], "--batch-size"),
     (["--method", "tome"], "unknown method"), (["--method-arg", "bogus=1"], "bogus"),
     (["--method", "pooling", "--method-arg", "layout=spatial"], "layout"),
     (["--method-arg", "allocation=softmax"], "allocation")],
)
def test_bench_cli_errors(args, message, capsys):
    assert main(["bench", *args]) != 0
    err = capsys.readouterr().err
    assert "globalcom2: error:" in err and message in err and "Traceback" not in err


def test_efficiency_cli_formats(capsys):
    assert main(["efficiency", "--ratios", "1,0.25", "--hardware", "H200"]) == 0
    table = capsys.readouterr().out
    assert "H200" in table and "| ratio |" in table and "720" in table
    assert main(["efficiency", "--ratios", "1,0.25", "--format", "json", "--text-tokens", "60"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["visual_tokens"] for r in rows] == [2880, 720] and rows[1]["text_tokens"] == 60
    assert main(["efficiency", "--ratios", "0.5", "--format", "csv", "--model", "llava-hf/llama3-llava-next-8b-hf"]) == 0
    csv = capsys.readouterr().out.strip().splitlines()
    assert csv[0].startswith("ratio,") and csv[1].startswith("0.5,1440,")


def test_efficiency_cli_local_config(tmp_path, capsys, tiny):
    tiny[0].config.save_pretrained(tmp_path)
    assert main(["efficiency", "--model", str(tmp_path), "--format", "json", "--ratios", "1"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    t = tiny[0].config.text_config
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 2
    assert row["kv_cache_mib"] * 1024 * 1024 == pytest.approx(per_token * 2880)


@pytest.mark.parametrize(
    "args, message",
    [(["--hardware", "TPUv9"], "unknown hardware"), (["--ratios", "abc"], "not a number"),
     (["--text-tokens", "-1"], "text-tokens"), (["--model", "/no/such/dir"], "model directory not found: /no/such/dir")],
)
def test_efficiency_cli_errors(args, message, capsys):
    assert main(["efficiency", *args]) != 0
    err = capsys.readouterr().err
    assert "globalcom2: error:" in err and message in err and "Traceback" not in err


def test_efficiency_cli_unknown_model_offline(monkeypatch, capsys, tmp_path):
    """An unknown hub id takes the one quick hub look of every command (here: offline, not cached)."""
    import huggingface_hub.constants

    import globalcom2.cli.loading as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(cli, "_HUB_CHECKED", {})
    assert main(["efficiency", "--model", "someone/unknown-llava"]) != 0
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "known offline" in err and "Traceback" not in err


def test_run_bench_compares_methods(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0,
                           methods=["fastervlm", "pooling"], options={"layout": "official"})
    assert [r.method for r in rows] == ["vanilla", "fastervlm R=0.25", "pooling R=0.25"]
    n_img = int((inputs.input_ids == model.config.image_token_id).sum())
    for r in rows[1:]:
        assert 0.15 < r.visual_tokens / n_img < 0.4 and r.effective_tokens == r.visual_tokens
        assert r.compress_ms > 0
    assert not globalcom2.is_applied(model)


def test_bench_cli_method_comparison(capsys):
    code = main(["bench", "--runs", "1", "--warmup", "0", "--max-new-tokens", "1", "--ratios", "0.25",
                 "--method", "globalcom2,random", "--method-arg", "seed=2", "--format", "csv"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(",")[0] for line in lines[-3:]] == ["vanilla", "globalcom2 R=0.25", "random R=0.25"]


def test_efficiency_cli_fastv_layer(capsys):
    assert main(["efficiency", "--ratios", "0.25", "--fastv-layer", "2", "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1].startswith("0.25,720,11.6")
    assert main(["efficiency", "--fastv-layer", "0"]) == 1
    assert "--fastv-layer" in capsys.readouterr().err


# --- what bench measures: grad mode, generate's prefill, decode, memory above the weights -------


def _lm(model):
    return model.model.language_model


def test_grad_mode_is_the_callers_unless_no_grad(tiny):
    """By default the prefill runs with autograd on (as a user's model(...)), vanilla and patched
    alike; generate runs without a graph on its own. no_grad=True wraps every call."""
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    seen = []
    handle = _lm(model).register_forward_pre_hook(
        lambda m, a, k: seen.append((globalcom2.is_applied(model), k["inputs_embeds"].shape[1] > 1, torch.is_grad_enabled())),
        with_kwargs=True,
    )
    try:
        bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0)
        default = set(seen)
        seen.clear()
        bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0, no_grad=True)
        wrapped = set(seen)
    finally:
        handle.remove()
    for patched in (False, True):
        # prefills: the timed forward with grad on, generate's own without; decode steps without
        assert {g for p, prefill, g in default if p == patched and prefill} == {True, False}
        assert {g for p, prefill, g in default if p == patched and not prefill} == {False}
    assert {g for _, _, g in wrapped} == {False} and {p for p, _, _ in wrapped} == {False, True}


def test_prefill_computes_the_last_positions_logits_only(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640), make_image(300, 900, 1)], text=["<image>\nhi"] * 2,
                       return_tensors="pt", padding=True)
    calls = []

    def hook(module, args, kwargs, out):
        if kwargs.get("pixel_values") is not None:  # a prefill: bench's own or generate's first step
            calls.append((globalcom2.is_applied(model), kwargs.get("logits_to_keep"), tuple(out.logits.shape)))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0)
    finally:
        handle.remove()
    vocab = model.config.text_config.vocab_size
    assert {p for p, _, _ in calls} == {False, True}
    assert all(keep == 1 and shape == (2, 1, vocab) for _, keep, shape in calls), calls


def test_decode_column_and_language_model_figures(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=3, runs=2, warmup=1,
                           methods=("globalcom2", "fastv"))
    vanilla, gc2, fastv = rows
    assert all(r.decode_ms_per_token > 0 and r.lm_prefill_ms > 0 for r in rows)
    # The decode time per token excludes the prefill: n tokens cost about prefill + (n - 1) steps.
    assert all(r.decode_ms_per_token < r.generate_ms / 2 for r in rows)
    assert all(0 < r.lm_prefill_ms < r.prefill_ms for r in rows)
    # The language model prefilled the sequence it was given, and the analytic FLOPs are those of
    # its decoder layers at that length (FastV: layers >= K at the pruned length).
    from dataclasses import replace

    from globalcom2 import efficiency

    arch = efficiency.LMArch.from_text_config(model.config.text_config)
    n_img = int((inputs.input_ids == model.config.image_token_id).sum())
    prompt = inputs.input_ids.shape[1]
    assert vanilla.lm_tokens == fastv.lm_tokens == prompt
    assert gc2.lm_tokens == prompt - n_img + gc2.visual_tokens
    head = efficiency.lm_head_op(arch).flops
    assert vanilla.lm_tflops * 1e12 == pytest.approx(efficiency.prefill_flops(arch, prompt))
    assert gc2.lm_tflops * 1e12 == pytest.approx(efficiency.prefill_flops(arch, gc2.lm_tokens))
    assert gc2.lm_flops_x == pytest.approx(gc2.lm_tflops / vanilla.lm_tflops)
    fastv_config = globalcom2.methods.FastVConfig(retention_ratio=0.25)
    k, pruned = fastv_config.layer, prompt - n_img + fastv_config.kept(n_img)
    expected = (efficiency.prefill_flops(replace(arch, num_layers=k), prompt, lm_head=False)
                + efficiency.prefill_flops(replace(arch, num_layers=arch.num_layers - k), pruned, lm_head=False) + head)
    assert fastv.lm_tflops * 1e12 == pytest.approx(expected)


def test_decode_needs_two_new_tokens(tiny, capsys):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=1, runs=1, warmup=0)
    assert all(r.decode_ms_per_token != r.decode_ms_per_token for r in rows)  # NaN: no decode step
    assert main(["bench", "--runs", "1", "--warmup", "0", "--max-new-tokens", "1", "--ratios", "0.25",
                 "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out)[1]["decode_ms_per_token"] is None


def test_peak_memory_is_above_the_baseline(monkeypatch):
    """CPU: the peak RSS minus the baseline (a fake RSS here; the sampler's path)."""
    rss = {"now": 1000 * measure.MIB}
    monkeypatch.setattr(measure, "_rss_bytes", lambda: rss["now"])
    monkeypatch.setattr(measure, "_reset_peak_rss", lambda: False)
    with measure.PeakMemory(torch.device("cpu"), baseline=900 * measure.MIB) as mem:
        rss["now"] = 1300 * measure.MIB
        time.sleep(0.02)
        rss["now"] = 1100 * measure.MIB
    assert mem.peak == 1300 * measure.MIB and mem.above == 400 * measure.MIB
    with measure.PeakMemory(torch.device("cpu")) as mem:  # no baseline: the memory in use on entry
        rss["now"] = 1150 * measure.MIB
    assert mem.baseline == 1100 * measure.MIB and mem.above == 50 * measure.MIB


def test_peak_memory_catches_a_freed_allocation():
    if not measure._reset_peak_rss():
        pytest.skip("no resettable VmHWM (not Linux, or /proc/self/clear_refs not writable)")
    measure.settle(torch.device("cpu"))
    with measure.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * measure.MIB // 4)  # 64 MiB, touched, then freed before the block ends
        del x
    assert mem.above >= 60 * measure.MIB


def test_run_bench_subtracts_the_memory_in_use_after_loading(tiny, monkeypatch):
    """With an RSS that never moves, every figure above the weights is 0: the absolute RSS
    (weights, the process) is the baseline, not part of any row."""
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    monkeypatch.setattr(measure, "_rss_bytes", lambda: 5000 * measure.MIB)
    monkeypatch.setattr(measure, "_reset_peak_rss", lambda: False)
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0)
    assert all(r.baseline_mib == 5000 and r.peak_mem_mib == 0 and r.prefill_mem_mib == 0 for r in rows)


def test_run_bench_memory_is_far_below_the_process(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0)
    assert rows[0].baseline_mib > 100  # the process: python, torch, the weights
    assert all(0 <= r.peak_mem_mib < r.baseline_mib / 2 and r.prefill_mem_mib < r.baseline_mib / 2 for r in rows)


# --- the wide random model --------------------------------------------------------------------


def test_wide_config_has_the_real_widths():
    from globalcom2.models.llava_next import LlavaNextFamily
    from globalcom2.tiny import build_wide_config

    config = build_wide_config(text_layers=3)
    v, t = config.vision_config, config.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, v.num_hidden_layers,
            v.num_attention_heads, v.hidden_act) == (336, 14, 1024, 4096, 24, 16, "quick_gelu")
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
            t.num_hidden_layers) == (4096, 11008, 32, 32, 3)
    assert config.vision_feature_layer == -2 and LlavaNextFamily.max_visual_tokens(config) == 2880
    with pytest.raises(ValueError, match="text_layers"):
        build_wide_config(text_layers=0)


def test_wide_random_model_from_the_cli_helper():
    """Built on the meta device (no memory, seconds): the real sizes, and a 672x672 image gets
    llava-v1.6-vicuna-7b's 2,928 placeholders from its processor."""
    from globalcom2.cli import loading

    model, processor = loading.get_model("wide-random:1", "meta", torch.bfloat16)
    assert model.config.text_config.num_hidden_layers == 1 and model.dtype == torch.bfloat16
    d, i, vd = 4096, 11008, 1024
    per_layer = 4 * d * d + 3 * d * i + 2 * d
    lm = sum(p.numel() for p in model.model.language_model.layers.parameters())
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert lm == per_layer and 0.30e9 < tower < 0.31e9
    assert model.model.vision_tower.config.hidden_size == vd
    inputs = processor(images=[make_image(672, 672)], text=["<image>\nhi"], return_tensors="pt")
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == 576 + 4 * 576 + 2 * 24
    assert loading.builtin_model("wide-random") == ("wide-random", None)
    assert loading.builtin_model("wide-random:4") == ("wide-random", 4)
    assert loading.builtin_model("tiny") == ("tiny", None) and loading.builtin_model("org/x") is None
    for bad in ("wide-random:0", "wide-random:x"):
        with pytest.raises(CLIError, match="layer count"):
            loading.builtin_model(bad)


def test_bench_help_names_what_it_measures(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--no-grad", "random[:N]", "--model wide-random", "Vicuna-7B", "logits for the last position", "decode",
                  "above the loaded weights", "torch.no_grad()", "LM prefill"):
        assert words in text, words


def test_bench_cli_no_grad_and_bad_wide_layers(capsys):
    assert main(["bench", "--model", "wide-random:zero"]) == 1
    assert "layer count" in capsys.readouterr().err
    code = main(["bench", "--runs", "1", "--warmup", "0", "--max-new-tokens", "2", "--ratios", "0.25",
                 "--no-grad", "--format", "json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and all(r["no_grad"] for r in rows)
    for key in ("lm_prefill_ms", "lm_flops_x", "decode_ms_per_token", "prefill_mem_mib", "baseline_mib"):
        assert key in rows[1]


def test_nothing_with_a_graph_is_alive_when_memory_is_measured(tiny, monkeypatch):
    """In grad mode the vision outputs timed before the prefill hold the tower's autograd graph;
    none may still be alive when a prefill or generate's memory is measured (it once was, and
    counted against the methods)."""
    import gc
    import warnings

    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    alive = []

    class Counting(measure.PeakMemory):
        def __enter__(self):
            gc.collect()
            with warnings.catch_warnings():  # isinstance() on torch's deprecated module proxies warns
                warnings.simplefilter("ignore", FutureWarning)
                alive.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None))
            return super().__enter__()

    monkeypatch.setattr(bench, "PeakMemory", Counting)
    bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=1, methods=("globalcom2", "pooling"))
    assert len(alive) == 6 and alive == [0] * 6


def test_bench_cli_out_of_memory_suggests_no_grad(monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "run_bench", oom)
    assert main(["bench", "--runs", "1", "--warmup", "0", "--ratios", "0.25"]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "--no-grad" in err and "Traceback" not in err
    assert main(["bench", "--runs", "1", "--warmup", "0", "--ratios", "0.25", "--no-grad"]) == 1
    assert "try --no-grad" not in capsys.readouterr().err
