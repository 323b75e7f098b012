"""capsfast.hub: a model saved in the Hugging Face Hub's way (save_pretrained, from_pretrained,
push_to_hub) is capsfast's own export plus its card. A trained model makes the round trip bit for
bit with its card intact; the card's figures are the run's summary.json; the Hub's side (upload,
download) is replaced by fakes at huggingface_hub's own functions, since CI has no network and no
token; without the network, a Hub id is one line that says so."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants, hub_mixin

from capsfast.baseline import BaselineCNN, BaselineConfig
from capsfast.data import load_mnist, to_float
from capsfast.export import ModelError, load_model
from capsfast.hub import HUB_FILES
from capsfast.model import CapsNet, ModelConfig

FILES = sorted(HUB_FILES)  # README.md, config.json, model.safetensors


def _tiny_capsnet() -> CapsNet:
    torch.manual_seed(0)
    cfg = ModelConfig(conv_channels=16, primary_types=4, decoder_hidden=(16, 32))
    return CapsNet(cfg).eval()


@functools.cache
def _digits(n: int = 32) -> torch.Tensor:
    return to_float(load_mnist().test_images[:n])


def _outputs(model, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return [out.lengths, out.poses, out.reconstructions]


def _assert_identical(a, b) -> None:
    for x, y in zip(_outputs(a, _digits()), _outputs(b, _digits()), strict=True):
        assert torch.equal(x, y)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_trained_model_round_trips_through_the_hub_format(trained_model_dir, tmp_path):
    summary_file = Path(trained_model_dir).parent / "summary.json"
    if not summary_file.is_file():  # CAPSFAST_TEST_MODEL named an export without its run
        pytest.skip(f"no summary.json beside {trained_model_dir}")
    summary = json.loads(summary_file.read_text())
    card = (Path(trained_model_dir) / "README.md").read_text()  # the trainer wrote it
    model = load_model(trained_model_dir)
    model.save_pretrained(tmp_path / "hub")
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == FILES
    assert (tmp_path / "hub" / "README.md").read_text() == card  # the card travels along
    _assert_identical(model, CapsNet.from_pretrained(tmp_path / "hub"))
    _assert_identical(model, load_model(tmp_path / "hub"))
    _assert_identical(model, CapsNet.from_pretrained(trained_model_dir))  # the same directories

    meta = _front_matter(card)
    assert meta["library_name"] == "capsfast" and meta["datasets"] == [summary["dataset"]]
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "accuracy"
    assert metric["value"] == round(summary["test_accuracy"] * 100, 2)
    assert f"on {summary['test_size']} test images" in metric["name"]
    # The Hub's own parser reads the same figure.
    result = ModelCard.load(tmp_path / "hub" / "README.md").data.eval_results[0]
    assert result.metric_value == metric["value"] and result.dataset_name == summary["dataset"]
    body = card.split("---\n", 2)[2]
    assert f"--max-steps {summary['steps']}" in body  # the command that trains it again
    assert f"Hardware: {summary['device']}" in body and "min of wall time" in body


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    """Everything up to the upload: huggingface_hub's HfApi is a fake that keeps the folder."""
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = repo_id
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    model = _tiny_capsnet()
    model.push_to_hub("someone/tiny-capsnet", token="hf_test")
    assert calls == {"token": "hf_test", "repo": "someone/tiny-capsnet"}
    assert sorted(p.name for p in (tmp_path / "uploaded").iterdir()) == FILES
    _assert_identical(model, load_model(tmp_path / "uploaded"))
    meta = _front_matter((tmp_path / "uploaded" / "README.md").read_text())
    assert meta["library_name"] == "capsfast" and "model-index" not in meta  # nothing measured


def test_from_pretrained_reads_a_hub_repository(tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub's downloads (fakes serving a saved folder)."""
    model = _tiny_capsnet()
    model.save_pretrained(tmp_path / "repo")
    asked = []

    def file_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(tmp_path / "repo" / filename)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "repo")

    monkeypatch.setattr(hub_mixin, "hf_hub_download", file_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    _assert_identical(model, CapsNet.from_pretrained("someone/tiny-capsnet"))
    assert ("someone/tiny-capsnet", tuple(HUB_FILES)) in asked


def test_a_hub_id_without_the_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub loaded
    with pytest.raises(ModelError) as e:
        CapsNet.from_pretrained("someone/capsnet-mnist", cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert "\n" not in message and "needs the network" in message, message
    assert message.startswith("someone/capsnet-mnist is no local model directory")


def test_load_model_and_from_pretrained_refuse_the_same_directories(tmp_path):
    _tiny_capsnet().save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").unlink()
    for bad in (tmp_path / "missing", tmp_path / "broken", tmp_path / "broken" / "config.json"):
        with pytest.raises(ModelError) as by_load:
            load_model(bad)
        with pytest.raises(ModelError) as by_hub:
            CapsNet.from_pretrained(bad)
        assert str(by_hub.value) == str(by_load.value)


def test_the_baseline_saves_and_loads_the_same_way(tmp_path):
    torch.manual_seed(0)
    model = BaselineCNN(BaselineConfig(conv_channels=(4, 4, 2), hidden=(8, 8))).eval()
    model.save_pretrained(tmp_path / "baseline")
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == FILES
    x = _digits()
    with torch.no_grad():
        want = model(x).logits
        for again in (BaselineCNN.from_pretrained(tmp_path / "baseline"),
                      load_model(tmp_path / "baseline")):  # fmt: skip
            assert isinstance(again, BaselineCNN) and torch.equal(again(x).logits, want)
    with pytest.raises(ModelError, match="holds a BaselineCNN, not a CapsNet"):
        CapsNet.from_pretrained(tmp_path / "baseline")
