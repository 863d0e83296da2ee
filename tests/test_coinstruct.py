"""experts/coinstruct.py: argument handling and the JSON answer. The 16 GB model is not run here:
`load_model` is replaced by a stand-in with Co-Instruct's `chat(prompt, images, max_new_tokens)`."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experts"))
import coinstruct  # noqa: E402


class StandIn:
    def __init__(self):
        self.calls = []

    def chat(self, prompt, images, max_new_tokens):
        print("loading vision tower...")  # the real model prints too: it must not reach stdout
        self.calls.append((prompt, images[0].size, max_new_tokens))
        return f"  The image is {images[0].size[0]} pixels wide and slightly blurry.  "


def test_prints_one_description_per_image_as_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    for name, width in (("b.png", 8), ("a.png", 6)):
        Image.fromarray(np.zeros((4, width, 3), np.uint8)).save(tmp_path / "images" / name)
    model = StandIn()
    monkeypatch.setattr(coinstruct, "load_model", lambda name, device: model)
    assert coinstruct.main([str(tmp_path), "--max-new-tokens", "50", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"texts": {"a.png": "The image is 6 pixels wide and slightly blurry.",
                             "b.png": "The image is 8 pixels wide and slightly blurry."}}
    assert model.calls[0][0] == coinstruct.PROMPT and "<|image|>" in coinstruct.PROMPT and model.calls[0][2] == 50


def test_empty_folder_and_missing_argument(tmp_path, capsys):
    assert coinstruct.main([str(tmp_path)]) == 2
    assert "no images in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        coinstruct.main([])
