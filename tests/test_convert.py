"""Released-checkpoint conversion, both directions, on state dicts laid out like the released files."""
import dataclasses
import pickle

import pytest
import torch
from torch import nn

import ssamba
from ssamba.checkpoints import load_checkpoint, released_to_ours
from ssamba.convert import ConversionError, main, ours_to_released, to_lightning_checkpoint
from ssamba.models import build_encoder, encoder_from_config, encoder_record

# Released widths (the converter names the size from it), shallow and short so tests stay fast.
SMALL = {"ssamba": {"depth": 2, "d_state": 4, "input_tdim": 48}, "ssast": {"depth": 2, "input_tdim": 48}}


def make_encoder(family):
    torch.manual_seed(0)
    return build_encoder(f"{family}_tiny", **SMALL[family]).eval()


def pred_head(width, out):
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


def released_layout(encoder, family):
    """A state dict as the released training scripts save it (DataParallel, backbone under v.)."""
    width, cfg = encoder.embed_dim, encoder.config
    state = {f"v.{k}": v.clone() for k, v in encoder.state_dict().items()}
    state["v.head.weight"], state["v.head.bias"] = torch.randn(1000, width), torch.randn(1000)
    if family == "ssast":
        state["v.head_dist.weight"], state["v.head_dist.bias"] = torch.randn(1000, width), torch.randn(1000)
    state["mask_embed"] = torch.randn(1, 1, width)
    for name in ("cpredlayer", "gpredlayer"):
        state.update({f"{name}.{k}": v for k, v in pred_head(width, cfg.fshape * cfg.tshape).state_dict().items()})
    state["p_input_fdim"] = nn.Parameter(torch.tensor(cfg.input_fdim), requires_grad=False).data
    state["p_input_tdim"] = nn.Parameter(torch.tensor(cfg.input_tdim), requires_grad=False).data
    return {f"module.{k}": v for k, v in state.items()}


def head_keys(family):
    return {"module.v.head.weight", "module.v.head.bias"} | (
        {"module.v.head_dist.weight", "module.v.head_dist.bias"} if family == "ssast" else set())


@pytest.mark.parametrize("family", ["ssamba", "ssast"])
def test_released_file_converts_and_reproduces_outputs(family, tmp_path, capsys):
    encoder = make_encoder(family)
    released = released_layout(encoder, family)
    torch.save(released, tmp_path / "released.pth")

    assert main([str(tmp_path / "released.pth"), str(tmp_path / "ours.ckpt"), "--from", family]) == 0
    reported = capsys.readouterr().err
    assert all(key in reported for key in head_keys(family))

    x = torch.randn(2, 48, 128)
    expected = encoder(x)
    for path in ("ours.ckpt", "released.pth"):  # finetuning and ssamba.load accept either file
        loaded = load_checkpoint(tmp_path / path)
        rebuilt = encoder_from_config(loaded.encoder_config).eval()
        rebuilt.load_state_dict(loaded.encoder_state)
        torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)
        assert loaded.encoder_config == encoder_record(encoder)
        assert loaded.target_length == 48 and loaded.norm_std == pytest.approx(4.5689974)
        assert set(loaded.task_state) == {"mask_embed"} | {f"{h}.{i}.{p}" for h in ("cpred", "gpred")
                                                           for i in (0, 2) for p in ("weight", "bias")}
        torch.testing.assert_close(loaded.task_state["cpred.2.bias"], released["module.cpredlayer.2.bias"])
    assert set(loaded.unused_keys) == head_keys(family)
    # the converted checkpoint still says where it came from, through a model folder and ssamba.load too
    provenance = load_checkpoint(tmp_path / "ours.ckpt").converted_from
    assert provenance["format"] == f"{family}-released" and set(provenance["unused_keys"]) == head_keys(family)
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "folder"), "--to-folder"]) == 0
    assert load_checkpoint(tmp_path / "folder").converted_from == provenance
    assert load_checkpoint(ssamba.save_pretrained(ssamba.load(tmp_path / "folder"),
                                                  tmp_path / "again")).converted_from == provenance


@pytest.mark.parametrize("value", ["ssamba-released", {"unused_keys": []}, {"format": "x", "unused_keys": "abc"}])
def test_malformed_provenance_is_refused(value, tmp_path):
    encoder = make_encoder("ssamba")
    ours = {"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
            "ssamba": {"encoder": dataclasses.asdict(encoder.config), "converted_from": value}}
    torch.save(ours, tmp_path / "ours.ckpt")
    with pytest.raises(ConversionError, match=r"\['converted_from'\]="):
        load_checkpoint(tmp_path / "ours.ckpt")


@pytest.mark.parametrize("family", ["ssamba", "ssast"])
def test_our_checkpoint_round_trips_through_the_released_layout(family, tmp_path, caplog):
    encoder = make_encoder(family)
    width = encoder.embed_dim
    task_state = {"mask_embed": torch.randn(1, 1, width), "head.weight": torch.randn(3, width)}
    for name in ("cpred", "gpred"):
        task_state.update({f"{name}.{k}": v for k, v in pred_head(width, 256).state_dict().items()})
    ours = {"state_dict": {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **task_state},
            "ssamba": {"encoder": dataclasses.asdict(encoder.config), "norm_mean": -1.0, "norm_std": 2.0,
                       "target_length": 48, "task": "pretrain", "label_names": []}}

    released, unused = ours_to_released(ours)
    assert unused == ["head.weight"]
    # the layout has no place for the statistics: said, and how to give them back when loading
    assert "trained with norm_mean=-1 norm_std=2: pass those when loading it" in caplog.text
    torch.save(released, tmp_path / "released.pth")
    assert (load_checkpoint(tmp_path / "released.pth", norm_mean=-1.0, norm_std=2.0).norm_mean, load_checkpoint(
        tmp_path / "released.pth").norm_mean) == (-1.0, pytest.approx(-4.2677393))
    assert "module.cpredlayer.0.weight" in released and released["module.p_input_tdim"].item() == 48
    back = released_to_ours(released, family, norm_mean=-1.0, norm_std=2.0)
    assert back.unused_keys == []
    for key, value in encoder.state_dict().items():
        assert torch.equal(back.encoder_state[key], value), key
    for key in task_state.keys() - {"head.weight"}:
        assert torch.equal(back.task_state[key], task_state[key]), key

    ckpt = to_lightning_checkpoint(back)
    torch.save(ckpt, tmp_path / "back.ckpt")
    loaded = load_checkpoint(tmp_path / "back.ckpt")
    rebuilt = encoder_from_config(loaded.encoder_config).eval()
    rebuilt.load_state_dict(loaded.encoder_state)
    x = torch.randn(1, 48, 128)
    torch.testing.assert_close(rebuilt(x), encoder(x), rtol=0, atol=0)
    assert (loaded.norm_mean, loaded.norm_std) == (-1.0, 2.0)


def test_shape_mismatch_names_the_key():
    released = released_layout(make_encoder("ssamba"), "ssamba")
    released["module.v.layers.1.mixer.x_proj.weight"] = torch.randn(5, 7)
    with pytest.raises(ConversionError, match=r"module\.v\.layers\.1\.mixer\.x_proj\.weight has shape \(5, 7\)"):
        released_to_ours(released, "ssamba")
    released = released_layout(make_encoder("ssast"), "ssast")
    released["module.gpredlayer.2.weight"] = torch.randn(100, 192)
    with pytest.raises(ConversionError, match=r"gpred\.2\.weight has shape \(100, 192\)"):
        released_to_ours(released, "ssast")


def test_missing_key_and_wrong_family_are_errors():
    released = released_layout(make_encoder("ssast"), "ssast")
    with pytest.raises(ConversionError, match="--from ssamba given, but its keys are those of a released ssast"):
        released_to_ours(released, "ssamba")
    del released["module.v.blocks.1.attn.proj.bias"]
    with pytest.raises(ConversionError, match=r"missing key module\.v\.blocks\.1\.attn\.proj\.bias"):
        released_to_ours(released, "ssast")


def test_grid_is_inferred_from_the_position_embedding_when_not_stored(caplog):
    released = released_layout(make_encoder("ssast"), "ssast")
    assert released_to_ours(released).encoder_config["input_tdim"] == 48 and "stores no input grid" not in caplog.text
    del released["module.p_input_fdim"], released["module.p_input_tdim"]
    assert released_to_ours(released).encoder_config["input_tdim"] == 48
    assert "stores no input grid" in caplog.text and "--fstride/--tstride/--input-tdim" in caplog.text
    with pytest.raises(ConversionError, match=r"v\.pos_embed holds 24 patch positions"):
        released_to_ours(released, fstride=5)  # 23 frequency patches do not divide 24 positions


def test_export_refuses_a_grid_the_released_layout_cannot_describe():
    encoder = make_encoder("ssast")
    encoder.set_grid(fstride=10, tstride=10)
    ours = {"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
            "ssamba": {"encoder": dataclasses.asdict(encoder.config)}}
    with pytest.raises(ConversionError, match="must equal its patch shape"):
        ours_to_released(ours)


class _NotATensor:
    pass


def test_files_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"module.v.cls_token": _NotATensor()}, f, protocol=2)
    with pytest.raises(ConversionError, match="evil.pth.*weights-only"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_other_widths_round_trip_given_the_heads():
    torch.manual_seed(0)
    encoder = build_encoder("ssast_tiny", embed_dim=32, num_heads=2, depth=1, input_tdim=32)
    released = {f"module.v.{k}": v for k, v in encoder.state_dict().items()}
    with pytest.raises(ConversionError, match="width 32.*pass num_heads"):
        released_to_ours(released)
    converted = released_to_ours(released, num_heads=2)
    assert converted.encoder_config == encoder_record(encoder)


@pytest.mark.parametrize("family", ["ssamba", "ssast"])
def test_pretraining_task_checkpoint_maps_onto_the_released_names_and_finetunes_from_a_pth(family, tmp_path):
    import functools

    from ssamba.tasks import Finetuning, MaskedPatchPretraining

    data = {"target_length": 48, "norm_mean": -4.0, "norm_std": 4.0, "label_names": ["a", "b"], "multilabel": False}
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    task = MaskedPatchPretraining(make_encoder(family), adamw, mask={"count": 8, "val_count": 8}, data=data)
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    released, unused = ours_to_released(checkpoint)
    assert unused == []
    assert set(released) == set(released_layout(task.encoder, family)) - head_keys(family)

    torch.save(released, tmp_path / "released.pth")
    finetune = Finetuning(adamw, pretrained=str(tmp_path / "released.pth"), fstride=10, tstride=10, data=data)
    assert finetune.encoder.grid == (12, 4)
    torch.testing.assert_close(finetune.encoder.patch_embed.proj.weight, task.encoder.patch_embed.proj.weight)
    assert finetune(torch.randn(2, 48, 128)).shape == (2, 2)


def test_backend_is_chosen_at_load_time_and_not_stored(tmp_path):
    encoder = build_encoder("ssamba_tiny", **SMALL["ssamba"], backend="torch").eval()
    assert "backend" not in encoder_record(encoder)
    old_record = {"encoder": {**dataclasses.asdict(encoder.config), "backend": "cuda"}, "norm_mean": -1.0,
                  "norm_std": 2.0, "target_length": 48, "task": "pretrain", "label_names": []}
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"state_dict": state, "ssamba": old_record}, tmp_path / "old.ckpt")  # as checkpoints were written

    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert "backend" not in loaded.encoder_config
    assert "backend" not in to_lightning_checkpoint(loaded)["ssamba"]["encoder"]
    assert loaded.build_encoder().config.backend == "auto"  # the stored "cuda" is not the encoder's identity
    rebuilt = loaded.build_encoder(backend="torch").eval()
    assert rebuilt.config.backend == "torch"
    x = torch.randn(1, 48, 128)
    torch.testing.assert_close(rebuilt(x), encoder(x), rtol=0, atol=0)
