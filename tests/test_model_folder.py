"""Model folders (config.json + model.safetensors): written from every checkpoint we read, read back
without unpickling anything, and giving the same outputs as the checkpoint they came from."""
import json
import sys

import pytest
import torch

import ssamba
from ssamba.checkpoints import ConversionError, load_checkpoint
from ssamba.convert import main

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_convert import make_encoder, released_layout  # noqa: E402
from test_evaluate import save_finetuned  # noqa: E402


def no_torch_load(*args, **kwargs):
    raise AssertionError("a model folder must load without torch.load (pickle)")


@pytest.mark.parametrize("family", ["ssamba", "ssast"])
def test_released_file_to_folder_gives_the_same_embeddings(family, tmp_path, monkeypatch, capsys):
    torch.save(released_layout(make_encoder(family), family), tmp_path / "released.pth")
    assert main([str(tmp_path / "released.pth"), str(tmp_path / "folder"), "--to-folder"]) == 0
    assert "as a model folder" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["family"] == family and config["encoder"]["name"] == f"{family}_tiny"
    assert config["norm_std"] == pytest.approx(4.5689974) and config["target_length"] == 48
    assert config["format_version"] == 1  # kaldi's mel scale: readers older than the scale read it right

    wav = torch.randn(16_000)
    expected = ssamba.load(tmp_path / "released.pth").embed(wav, 16_000)
    monkeypatch.setattr(torch, "load", no_torch_load)
    loaded = ssamba.load(tmp_path / "folder")
    got = loaded.embed(wav, 16_000)
    assert torch.equal(got.clip, expected.clip) and torch.equal(got.frames, expected.frames)
    assert loaded.metadata["source_format"] == "folder"


def test_finetuned_checkpoint_keeps_its_head_and_labels(tmp_path, monkeypatch):
    path = save_finetuned(tmp_path / "finetuned.ckpt")
    ssamba.save_pretrained(path, tmp_path / "folder")
    original = load_checkpoint(path)
    monkeypatch.setattr(torch, "load", no_torch_load)
    folder = load_checkpoint(tmp_path / "folder")
    assert folder.label_names == original.label_names and folder.head == original.head
    fbank = torch.randn(2, original.target_length, 128)
    with torch.no_grad():
        torch.testing.assert_close(folder.build_classifier()(fbank), original.build_classifier()(fbank), rtol=0, atol=0)
    # a model from ssamba.load holds the encoder only: its folder claims no head, task or labels
    monkeypatch.undo()
    encoder_only = load_checkpoint(ssamba.save_pretrained(ssamba.load(path), tmp_path / "encoder"))
    assert (encoder_only.head, encoder_only.task, encoder_only.label_names) == (None, None, [])


def test_a_loaded_model_saves_and_loads_back(tmp_path):
    encoder = make_encoder("ssamba")
    torch.save(released_layout(encoder, "ssamba"), tmp_path / "released.pth")
    model = ssamba.load(tmp_path / "released.pth")
    ssamba.save_pretrained(model, tmp_path / "folder")
    wav = torch.randn(8_000)
    torch.testing.assert_close(ssamba.load(tmp_path / "folder").embed(wav, 16_000).clip,
                               model.embed(wav, 16_000).clip, rtol=0, atol=0)
    with pytest.raises(TypeError, match="checkpoint path, a Checkpoint or a model from ssamba.load"):
        ssamba.save_pretrained(encoder, tmp_path / "other")


def test_broken_folders_are_refused_in_one_line(tmp_path):
    torch.save(released_layout(make_encoder("ssast"), "ssast"), tmp_path / "released.pth")
    folder = ssamba.save_pretrained(tmp_path / "released.pth", tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ConversionError, match="format_version 99 is newer"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(ConversionError, match="format 'something-else'"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="not a model folder, missing model.safetensors"):
        load_checkpoint(folder)


def test_a_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ConversionError, match=r"hf://org/model: .*pip install huggingface_hub"):
        ssamba.load("hf://org/model")


def test_a_hub_id_loads_the_downloaded_folder(tmp_path, monkeypatch):
    """The hf:// path as huggingface_hub serves it: snapshot_download gets the id and only the two
    files, and returns a local folder; a failed download is one line naming the id."""
    import types

    torch.save(released_layout(make_encoder("ssamba"), "ssamba"), tmp_path / "released.pth")
    folder = ssamba.save_pretrained(tmp_path / "released.pth", tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None):
        calls.append((repo_id, sorted(allow_patterns)))
        if repo_id != "org/model":
            raise RuntimeError("404 Client Error: repository not found")
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    wav = torch.randn(8_000)
    got = ssamba.load("hf://org/model").embed(wav, 16_000).clip
    torch.testing.assert_close(got, ssamba.load(folder).embed(wav, 16_000).clip, rtol=0, atol=0)
    assert calls == [("org/model", ["config.json", "model.safetensors"])]
    with pytest.raises(ConversionError, match=r"hf://org/missing: could not download \(RuntimeError: 404"):
        ssamba.load("hf://org/missing")


def test_finetuning_starts_from_a_model_folder(tmp_path):
    from hydra import compose, initialize_config_dir

    from ssamba.tasks.finetune import load_pretrained_encoder
    from ssamba.utils.config import validate_config

    encoder = make_encoder("ssamba")
    torch.save(released_layout(encoder, "ssamba"), tmp_path / "released.pth")
    folder = ssamba.save_pretrained(tmp_path / "released.pth", tmp_path / "folder")
    loaded, _ = load_pretrained_encoder(str(folder))
    x = torch.randn(1, 48, 128)
    torch.testing.assert_close(loaded.eval()(x), encoder(x), rtol=0, atol=0)
    conf = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=unused", "task=finetune", f"task.pretrained={folder}",
                                          "trainer=cpu"])
    validate_config(cfg)  # a folder is a checkpoint to finetune from
