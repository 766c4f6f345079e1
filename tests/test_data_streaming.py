"""Sharded streaming: a manifest packed into litdata chunks streams back complete, and DDP ranks
and DataLoader workers see disjoint parts."""

import json
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("litdata", reason="streaming needs the litdata package (a core dependency; often missing on GPU images)")
from litdata.utilities.env import _DistributedEnv  # noqa: E402

from ssamba.data import ManifestDataModule  # noqa: E402
from ssamba.data.streaming import ShardDataModule, write_shards  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    (root / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N):
        sf.write(root / f"c{i}.wav", rng.uniform(-0.3, 0.3, 3200), 16000, subtype="PCM_16")
        entries.append({"wav": f"c{i}.wav", "labels": "/m/a" if i % 2 else "/m/b"})
    (root / "train.json").write_text(json.dumps({"data": entries}))
    source = ManifestDataModule(train_manifest=str(root / "train.json"), root=str(root),
                                label_csv=str(root / "class_labels_indices.csv"))
    out = root / "shards"
    assert write_shards(source, "train", str(out), chunk_bytes="16KB", workers=1) == N
    assert len(list(out.glob("chunk-*.bin"))) > 2
    return out


def module(shards, **kwargs):
    return ShardDataModule(**{"train_dir": str(shards), "batch_size": 4, "target_length": 32, **kwargs})


def ids_of(loader):
    return [i for batch in loader for i in batch["id"]]


def test_streams_every_item_once_with_labels(shards):
    dm = module(shards, num_workers=1)
    dm.setup("fit")
    assert dm.label_names == ["A", "B"] and dm.multilabel
    batches = list(dm.train_dataloader())
    ids = [i for b in batches for i in b["id"]]
    assert sorted(ids) == sorted(f"c{i}.wav" for i in range(N))
    for batch in batches:
        assert batch["fbank"].shape[1:] == (32, 128)
        for item_id, target in zip(batch["id"], batch["target"]):
            assert target.argmax().item() == (0 if int(item_id[1:-4]) % 2 else 1)


def test_ranks_see_disjoint_parts(shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls, r=rank: cls(2, r, 1)))
        dm = module(shards, batch_size=3)  # 12 items = 2 ranks x 2 batches of 3: nothing dropped
        dm.setup("fit")
        seen.append(set(ids_of(dm.train_dataloader())))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == N


@pytest.mark.parametrize("world", [2, 4])
def test_every_validation_item_is_scored_once_across_ranks(shards, monkeypatch, caplog, world):
    seen = []
    for rank in range(world):
        monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls, r=rank: cls(world, r, 1)))
        dm = module(shards, val_dir=str(shards), batch_size=5)  # 12 items: a uniform share would drop some
        dm.setup("validate")
        seen += ids_of(dm.val_dataloader())
    assert sorted(seen) == sorted(f"c{i}.wav" for i in range(N))
    assert "disabled the `drop_last` option" not in caplog.text  # litdata's warning is about training


def test_remote_shards_need_a_local_sidecar(tmp_path, capsys):
    from ssamba.data.streaming import main

    with pytest.raises(SystemExit) as stopped:
        main(["--out", "s3://bucket/shards", "data=synthetic"])
    assert stopped.value.code == 2 and "give --sidecar <local path>" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give a local path for ssamba.json"):
        write_shards(None, "train", "s3://bucket/shards")


def test_shards_name_the_feature_settings_they_were_packed_with(shards, caplog):
    sidecar = json.loads((shards / "ssamba.json").read_text())
    assert sidecar["input"]["norm_mean"] == pytest.approx(-4.2677393) and sidecar["input"]["target_length"] == 1024
    module(shards, target_length=1024)
    assert "packed from a data config" not in caplog.text
    module(shards, target_length=1024, norm_mean=-11.1)
    assert "packed from a data config with norm_mean=-4.2677393; this one gives norm_mean=-11.1" in caplog.text


def test_packing_a_weighted_mixture_says_the_weights_stay_behind(tmp_path, caplog):
    from ssamba.data import MixtureDataModule, SyntheticDataModule

    sources = {"a": SyntheticDataModule(num_train=2, num_val=0, num_test=0, target_length=32),
               "b": SyntheticDataModule(num_train=3, num_val=0, num_test=0, target_length=32)}
    mixture = MixtureDataModule(sources, weights={"a": 0.9, "b": 0.1}, target_length=32)
    assert write_shards(mixture, "train", str(tmp_path / "mix"), chunk_bytes="16KB") == 5
    assert "data.weights (and data.samples_per_epoch) are not packed" in caplog.text


def test_mixup_is_refused(shards):
    with pytest.raises(ValueError, match="data.mixup"):
        module(shards, mixup=0.5)


def test_device_features_from_shards(shards):
    dm = module(shards, features_on_device=True, shuffle=False)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["fbank"].shape == (4, 32, 128) and torch.isfinite(batch["fbank"]).all()


def test_shards_are_written_by_spawned_workers_even_beside_a_notebook_kernel(tmp_path, monkeypatch):
    """litdata would fork its workers once ipykernel is imported (a notebook, or a test session that ran
    one); a fork of a process with live threads can hang, so write_shards asks for spawn, and puts the
    process's start method back afterwards."""
    import multiprocessing
    import types

    from ssamba.data import SyntheticDataModule

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    before = multiprocessing.get_start_method(allow_none=True)
    chosen = []
    original = multiprocessing.set_start_method
    monkeypatch.setattr(multiprocessing, "set_start_method",
                        lambda method, force=False: (chosen.append(method), original(method, force=force)))
    source = SyntheticDataModule(num_train=4, num_val=0, num_test=0, target_length=64)
    assert write_shards(source, "train", str(tmp_path / "shards"), chunk_bytes="16KB", workers=1) == 4
    assert chosen == ["spawn", before]
    assert multiprocessing.get_start_method(allow_none=True) == before
    dm = module(tmp_path / "shards", shuffle=False)
    dm.setup("fit")
    assert sorted(ids_of(dm.train_dataloader())) == sorted(f"synthetic-train-{i}" for i in range(4))
