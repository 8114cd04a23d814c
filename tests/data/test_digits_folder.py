"""tuna_digits (real sklearn digits) and tuna_folder (user images + JSONL, broken files skipped)."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data import digits, folder


def test_digits_splits_and_records(tmp_path):
  b = digits.TunaDigits(data_dir=str(tmp_path), size=32)
  b.download_and_prepare()
  splits = ("train", "validation", "test")
  n = {s: len(tfds.data_source("tuna_digits", split=s, data_dir=str(tmp_path))) for s in splits}
  assert n == dict(train=1437, validation=180, test=180)
  sets = [set(digits.split_indices(s, 1797)) for s in ("train", "validation", "test")]
  assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
  r = tfds.data_source("tuna_digits", split="test", data_dir=str(tmp_path))[0]
  meta = json.loads(r["meta"])
  assert r["image"].shape == (32, 32, 3) and r["image"].min() < 100 and r["image"].max() == 255
  assert r["qa"]["answer"][0].decode() == str(meta["label"]) and str(meta["label"]) in r["caption"].decode()
  with pytest.raises(ValueError, match="multiple of 16"):
    digits.TunaDigits(data_dir=str(tmp_path), size=20)


def test_folder_converts_and_skips_broken_images(tmp_path):
  img_dir = tmp_path / "images"
  img_dir.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 30, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    lines.append({"image": f"{i}.png", "caption": f"picture {i}"})
  (img_dir / "broken.jpg").write_bytes(b"not an image at all")
  lines.append({"image": "broken.jpg", "caption": "never read"})
  lines.append({"image": "missing.png", "text": "no such file"})
  lines.append({"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                    {"from": "gpt", "value": "Noise."}]})
  Image.fromarray(np.zeros((40, 2000, 3), np.uint8)).save(img_dir / "wide.png")
  lines.append({"image": "wide.png", "TEXT": "a wide black strip"})  # LAION-style key
  (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  b = folder.TunaFolder(data_dir=str(tmp_path / "out"), images=str(img_dir),
                        jsonl=str(tmp_path / "meta.jsonl"), max_side=256)
  b.download_and_prepare()
  assert len(b.skipped) == 2 and any("broken.jpg" in s for s in b.skipped)
  src = tfds.data_source("tuna_folder", split="train", data_dir=str(tmp_path / "out"))
  recs = {src[i]["caption"].decode(): src[i] for i in range(len(src))}
  assert len(src) == 7
  assert recs["a wide black strip"]["image"].shape[1] == 256  # downscaled, aspect kept
  chat = next(r for r in recs.values() if len(r["qa"]["question"]))
  assert chat["qa"]["question"][0].decode() == "What is it?" and chat["qa"]["answer"][0].decode() == "Noise."


def test_folder_bad_jsonl_names_the_line(tmp_path):
  (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
  with pytest.raises(ValueError, match=r"m.jsonl:2"):
    folder.read_items(str(tmp_path), str(tmp_path / "m.jsonl"))
