"""Measured benchmark (`globalcom2 bench`) and analytic efficiency (`globalcom2 efficiency`) commands."""

import json

import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2 import bench
from globalcom2.cli import main

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
    assert vanilla.kv_cache_mib * bench.MIB == per_token * prompt
    assert comp.kv_cache_mib * bench.MIB == per_token * (prompt - n_img + comp.visual_tokens)
    assert vanilla.compress_ms == 0.0 and comp.compress_ms > 0
    assert all(r.prefill_ms > 0 and r.generate_ms > 0 and r.tokens_per_s > 0 and r.peak_mem_mib > 0 for r in rows)
    # The model is handed back as it was given: patched with its previous settings.
    assert globalcom2.get_config(model).retention_ratio == 0.5 and globalcom2.get_config(model).layout == "spatial"


def test_median_ms_excludes_warmup():
    calls = []
    ms, out = bench.median_ms(lambda: calls.append(1) or len(calls), torch.device("cpu"), runs=3, warmup=2)
    assert len(calls) == 5 and out == 5 and ms >= 0


def test_cache_bytes_walks_layers():
    class Layer:
        def __init__(self):
            self.keys = torch.zeros(1, 2, 3, 4)
            self.values = torch.zeros(1, 2, 3, 4)

    class Cache:
        layers = [Layer(), Layer()]

    assert bench.cache_bytes(Cache()) == 4 * 24 * 4
    assert bench.cache_bytes(None) == 0


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
     (["--text-tokens", "-1"], "text-tokens"), (["--model", "/no/such/dir"], "config.json")],
)
def test_efficiency_cli_errors(args, message, capsys):
    assert main(["efficiency", *args]) != 0
    err = capsys.readouterr().err
    assert "globalcom2: error:" in err and message in err and "Traceback" not in err


def test_efficiency_cli_unknown_model_offline(monkeypatch, capsys):
    import transformers

    def offline(*a, **k):
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    assert main(["efficiency", "--model", "someone/unknown-llava"]) != 0
    err = capsys.readouterr().err
    assert "known offline" in err and "Traceback" not in err


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
