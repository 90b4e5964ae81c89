"""``globalcom2 embed``: writes what ``compress_images`` returns, reads back in one call, and fails
fast (one line, nothing written) on bad input."""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2.cli import main
from globalcom2.generation import build_prompt

from conftest import make_image


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(480, 640), (300, 900), (1000, 300)]):
        p = tmp_path / f"img{i}.png"
        make_image(h, w, seed=i).save(p)
        paths.append(str(p))
    return paths


def test_embed_writes_the_compressed_tokens(tiny, images, tmp_path, capsys):
    model, processor = tiny
    out = tmp_path / "emb.safetensors"
    argv = ["embed", "--model", "tiny", "--image", *images, "--out", str(out), "--retention-ratio", "0.3",
            "--layout", "spatial", "--batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    emb = globalcom2.load_embeddings(out)
    assert emb.images == images and emb.model == "tiny" and emb.model_type == "llava_next"
    assert emb.config == globalcom2.GlobalCom2Config(retention_ratio=0.3, layout="spatial")
    for i, path in enumerate(images):
        from PIL import Image

        inputs = processor(images=[Image.open(path).convert("RGB")], text=[build_prompt(processor, "", 1)], return_tensors="pt")
        want = globalcom2.compress_images(model, inputs, emb.config)
        assert emb.counts[i] == want.counts[0] and emb.vanilla_counts[i] == want.vanilla_counts[0]
        assert torch.equal(emb.embeddings[i], want.embeddings[0])
        assert f"{want.vanilla_counts[0]:,} -> {want.counts[0]:>6,} visual tokens" in printed
    assert f"wrote {out}: 3 image(s)" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "{tmp}/e.bin"], "--out must name a .safetensors file"),
        (["--out", "{tmp}/missing/e.safetensors"], "missing"),
        (["--out", "{tmp}/e.safetensors", "--method", "fastv"], "FastV prunes inside the language model"),
        (["--out", "{tmp}/e.safetensors", "--retention-ratio", "0"], "retention"),
        (["--out", "{tmp}/e.safetensors", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--out", "{tmp}/e.safetensors", "--image", "{tmp}/nope.jpg"], "image file not found"),
    ],
)
def test_embed_fails_fast_and_writes_nothing(images, tmp_path, capsys, monkeypatch, extra, message):
    from globalcom2.cli import loading

    monkeypatch.setattr(loading, "get_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = ["embed", "--model", "tiny", "--image", images[0], *extra]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("globalcom2: error:") and message in err[0]
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*tmp"))


def test_embed_help_lists_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "embed" in capsys.readouterr().out
