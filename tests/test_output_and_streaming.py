"""Answer parsing, grounding boxes, and streaming: UTF-8-safe pieces tagged thinking / answer."""

import os

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.runtime.generation import GenerationConfig, stream_generate
from glm4v_ms.runtime.output import Box, draw_boxes, parse_boxes, rescale_boxes, split_thinking
from glm4v_ms.processing.tiny_tokenizer import build_tiny_tokenizer


def test_split_thinking():
    assert split_thinking("<think>a b</think><answer>c</answer>") == ("a b", "c")
    assert split_thinking("<think>\nlong</think>\n<answer>ok") == ("long", "ok")
    assert split_thinking("plain answer") == ("", "plain answer")
    assert split_thinking("<think>never closed") == ("never closed", "")


def test_boxes_parse_and_rescale():
    text = ("The cat <|begin_of_box|>[100, 200, 500, 800]<|end_of_box|> and dogs "
            "<|begin_of_box|>[[0,0,10,10],[990.5,0,1000,1000]]<|end_of_box|>; not a box [1,2,3,4].")
    boxes = parse_boxes(text)
    assert [b.as_list() for b in boxes] == [[100, 200, 500, 800], [0, 0, 10, 10], [990.5, 0, 1000, 1000]]
    px = rescale_boxes(boxes, 640, 480)
    assert px[0].as_list() == [64.0, 96.0, 320.0, 384.0]
    assert px[2].as_list() == [633.9, 0.0, 640.0, 480.0]
    assert rescale_boxes([Box(-5, 0, 1200, 1000)], 100, 100)[0].as_list() == [0.0, 0.0, 100.0, 100.0]


def test_draw_boxes_writes_atomically(tmp_path):
    img = Image.new("RGB", (200, 100), "white")
    out = draw_boxes(img, [Box(20, 10, 120, 90)], str(tmp_path / "out.png"))
    drawn = np.asarray(Image.open(out))
    assert (drawn[10, 20:120] == [255, 0, 0]).all() and (drawn[50, 60] == 255).all()
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


class _Scripted:
    """A stand-in model whose logits force a fixed token sequence (to test streaming without randomness)."""

    class _Out:
        def __init__(self, logits):
            self.logits = type("T", (), {"asnumpy": lambda s: logits})()

    def __init__(self, script, vocab):
        from glm4v_ms.model.config import TextConfig

        text = TextConfig.from_dict(dict(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, mrope_section=[1, 1, 2],
                                         max_position_embeddings=4096))
        self.config = type("C", (), {"text": text})()
        self.dtype = __import__("mindspore").float32
        self.script, self.vocab, self.i = list(script), vocab, 0

    def __call__(self, input_ids=None, cache=None, **kw):
        cache.begin(np.asarray(input_ids).shape[1], None)
        cache.rope_deltas = np.zeros((1, 1), np.int64)
        cache.commit(np.asarray(input_ids).shape[1])
        lg = np.full((1, 1, self.vocab), -10.0, np.float32)
        lg[0, 0, self.script[min(self.i, len(self.script) - 1)]] = 10.0
        self.i += 1
        return self._Out(lg)


def test_stream_pieces_are_utf8_safe_and_tagged(tmp_path):
    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    v = tok.get_vocab()
    think = tok.encode("一只猫坐在桌子上。", add_special_tokens=False)  # multi-byte characters over byte tokens
    answer = tok.encode("The answer is 42.", add_special_tokens=False)
    eos = v["<|endoftext|>"]
    script = [v["<think>"]] + think + [v["</think>"], v["<answer>"]] + answer + [v["</answer>"], eos]
    model = _Scripted(script, len(tok))
    gen = GenerationConfig(max_new_tokens=100, eos_token_id=[eos], pad_token_id=eos)
    out_ids = []
    pieces = list(stream_generate(model, tok, {"input_ids": np.array([[1, 2, 3]])}, gen, tokens_out=out_ids,
                                  mode="eager"))
    assert all("\ufffd" not in p.text for p in pieces), [p.text for p in pieces]
    assert "".join(p.text for p in pieces if p.kind == "thinking") == "一只猫坐在桌子上。"
    assert "".join(p.text for p in pieces if p.kind == "answer") == "The answer is 42."
    assert out_ids == script  # every generated id, the EOS included


def test_stream_rejects_a_batch(tmp_path):
    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    model = _Scripted([5], len(tok))
    with pytest.raises(ValueError, match="takes one prompt; got a batch of 2"):
        list(stream_generate(model, tok, {"input_ids": np.array([[1, 2], [3, 4]])}, GenerationConfig()))


def test_stream_starts_inside_thinking_when_the_prompt_opens_it(tmp_path):
    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    v = tok.get_vocab()
    eos = v["<|endoftext|>"]
    script = tok.encode("hmm", add_special_tokens=False) + [v["</think>"]] + \
        tok.encode("ok", add_special_tokens=False) + [eos]
    model = _Scripted(script, len(tok))
    gen = GenerationConfig(max_new_tokens=50, eos_token_id=[eos], pad_token_id=eos)
    pieces = list(stream_generate(model, tok, {"input_ids": np.array([[1, 2, v["<think>"]]])}, gen, mode="eager"))
    assert "".join(p.text for p in pieces if p.kind == "thinking") == "hmm"
    assert "".join(p.text for p in pieces if p.kind == "answer") == "ok"
