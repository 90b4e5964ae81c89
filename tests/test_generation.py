"""Shared prompt and generation settings (globalcom2.generation)."""

from types import SimpleNamespace

from globalcom2.generation import build_prompt, greedy_kwargs


class _Templated:
    image_token = "<image>"
    chat_template = "processor's own"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, conversation, **kwargs):
        self.calls.append((conversation, kwargs))
        return "applied"


def test_fallback_places_one_placeholder_per_image():
    plain = SimpleNamespace(chat_template=None, image_token="<img>")
    assert build_prompt(plain, "Q") == "<img>\nQ"
    assert build_prompt(plain, "Q", num_images=2) == "<img>\n<img>\nQ"
    assert build_prompt(plain, "Q", num_images=0) == "Q"


def test_template_gets_the_images_and_only_an_explicit_override():
    proc = _Templated()
    assert build_prompt(proc, "Q", num_images=2) == "applied"
    conversation, kwargs = proc.calls[-1]
    assert conversation == [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert "chat_template" not in kwargs and kwargs["add_generation_prompt"] is True
    build_prompt(proc, "Q", chat_template="mine")
    assert proc.calls[-1][1]["chat_template"] == "mine"


def test_greedy_kwargs_pad_falls_back_to_eos():
    assert greedy_kwargs(SimpleNamespace(pad_token_id=0, eos_token_id=2), 5) == {
        "max_new_tokens": 5, "do_sample": False, "num_beams": 1, "pad_token_id": 0}
    assert greedy_kwargs(SimpleNamespace(pad_token_id=None, eos_token_id=2), 5)["pad_token_id"] == 2
    assert "pad_token_id" not in greedy_kwargs(SimpleNamespace(), 5)
