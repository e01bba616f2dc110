"""Data loading: layouts, subject selection, and clear errors that name the file or row."""
import json

import pytest
from PIL import Image

from freezeasguard.training.data import DataError, DomainSampler, load_image_captions, preprocess


def _folder(tmp_path, rows, images=("a.png", "b.png"), fmt="jsonl"):
    for name in images:
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / name)
    if fmt == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv
        with open(tmp_path / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return tmp_path


ROWS = [{"file_name": "a.png", "text": "a photo of Ann", "name": "Ann"},
        {"file_name": "b.png", "text": "a photo of Bob", "name": "Bob"}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_and_subject(tmp_path, fmt):
    d = _folder(tmp_path, ROWS, fmt=fmt)
    assert load_image_captions(d).captions == ["a photo of Ann", "a photo of Bob"]
    assert load_image_captions(d, subject="Bob").captions == ["a photo of Bob"]
    with pytest.raises(DataError, match="no rows for subject 'Cid'"):
        load_image_captions(d, subject="Cid")


def test_nested_file_names_ff25_layout(tmp_path):
    (tmp_path / "Ann_Lee").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "Ann_Lee" / "1.png")
    _folder(tmp_path, [{"file_name": "Ann_Lee/1.png", "text": "a photo of Ann Lee", "name": "Ann Lee"}], images=(),
            fmt="csv")
    assert load_image_captions(tmp_path, subject="Ann Lee").records[0].path.name == "1.png"


def test_errors_name_the_problem(tmp_path):
    d = _folder(tmp_path, ROWS)
    (d / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"row 2.*b\.png.*cannot decode"):
        load_image_captions(d)
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "zzz.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="zzz.png is missing"):
        load_image_captions(d)
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "  "}) + "\n")
    with pytest.raises(DataError, match="empty caption"):
        load_image_captions(d)
    (d / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        load_image_captions(d)
    with pytest.raises(DataError, match="no such data folder"):
        load_image_captions(tmp_path / "nope")


def test_saved_hf_dataset(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (20, 20), (0, 0, 255))] * 3,
                                     "text": ["a blue square", "a blue logo", "a blue scarf"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_image_captions(tmp_path / "ds")
    assert data.captions == ["a blue square", "a blue logo", "a blue scarf"]
    assert data.records[0].load().size == (20, 20)
    with pytest.raises(DataError, match="no 'caption' column"):
        load_image_captions(tmp_path / "ds", caption_column="caption")


def test_preprocess_resizes_and_center_crops():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (15, 0, 45, 30))   # white centre square
    x = preprocess(img, 16)
    assert x.shape == (3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    assert x[:, 4:12, 4:12].mean() > 0.95         # the crop kept the centre


def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = DomainSampler(10, seed=3)
    first = s.next(10)
    assert sorted(first) == list(range(10))
    s.next(3)
    state = {k: v.clone() for k, v in s.state_dict().items()}
    cont = s.next(25)
    s2 = DomainSampler(10, seed=99)
    s2.load_state_dict(state)
    assert s2.next(25) == cont
