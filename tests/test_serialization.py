"""The .kse format: round trips (dense, compressed, reshaped), index packing, bad files."""

import json
import struct

import pytest
import torch
import torch.nn as nn

import kse
from kse.models import get_model
from kse.prune import shrink_batchnorm, shrink_conv
from kse.serialization import CheckpointError, pack_indices, read_metadata, unpack_indices


def same_outputs(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_dense_round_trip(tmp_path):
    net = get_model("resnet20", num_classes=7, in_channels=1).eval()
    path = kse.save(net, tmp_path / "d.kse", preprocess={"input_size": [1, 28, 28], "mean": [0.5], "std": [0.2]})
    back = kse.load(path)
    same_outputs(net, back, torch.randn(2, 1, 28, 28))
    assert back.kse_preprocess["input_size"] == [1, 28, 28]
    assert back.kse_arch == {"name": "resnet20", "kwargs": {"num_classes": 7, "in_channels": 1}}


@pytest.mark.parametrize("form", ["train", "dense", "full", "split"])
def test_compressed_round_trip_keeps_form_and_structure(tmp_path, form):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    kse.deploy_(net, form=form)
    back = kse.load(kse.save(net, tmp_path / "c.kse", extra={"note": "x"}))
    same_outputs(net, back, torch.randn(2, 3, 32, 32))
    for name, m in net.named_modules():
        if isinstance(m, kse.KSEConv2d):
            b = back.get_submodule(name)
            assert b.form == form
            assert torch.equal(b.assignment, m.assignment) and torch.equal(b.kept_channels, m.kept_channels)
    assert back.kse_config["G"] == 4 and back.kse_extra == {"note": "x"}
    assert json.loads(json.dumps(read_metadata(tmp_path / "c.kse")))["format_version"] == 1


def test_file_describes_changed_channel_widths(tmp_path):
    """A filter-pruned network (widths changed, no KSE layer) saves and loads by itself."""
    net = get_model("resnet20").eval()
    block = net.layer2[1]
    block.conv1 = shrink_conv(block.conv1, remove_out=[0, 5, 7])
    block.bn1 = shrink_batchnorm(block.bn1, [0, 5, 7])
    block.conv2 = shrink_conv(block.conv2, remove_in=[0, 5, 7])
    back = kse.load(kse.save(net, tmp_path / "p.kse"))
    assert back.layer2[1].conv1.out_channels == 29
    same_outputs(net, back, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("q,N", [(1, 8), (2, 8), (3, 8), (5, 16), (16, 16), (7, 7)])
def test_index_packing_round_trip(q, N):
    g = torch.Generator().manual_seed(q)
    local = torch.randint(0, q, (4, N), generator=g)
    if q == N:
        local[0] = torch.arange(N)
    widths = [0 if (q == 1 or (q == N and torch.equal(r, torch.arange(N)))) else max(1, (q - 1).bit_length()) for r in local]
    packed = pack_indices(local, widths)
    assert packed.numel() == -(-sum(widths) * N // 8)  # ceil(bits / 8) bytes
    back = unpack_indices(packed, widths, [q] * 4, N)
    assert torch.equal(back, local if q > 1 else torch.zeros_like(local))


def test_stored_indices_use_log2_q_bits(tmp_path):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    from safetensors import safe_open

    kse.save(net, tmp_path / "c.kse")
    layer = net.layer3[1].conv2
    with safe_open(str(tmp_path / "c.kse"), "pt") as f:
        packed = f.get_tensor("layer3.1.conv2.assignment_packed")
    expected_bits = sum(layer.out_channels * (q - 1).bit_length() for q in layer.centroid_counts.tolist()
                        if 1 < q < layer.out_channels)
    assert packed.numel() == -(-expected_bits // 8)


def test_not_a_checkpoint_truncated_newer(tmp_path):
    net = get_model("resnet20").eval()
    good = kse.save(net, tmp_path / "good.kse")
    (tmp_path / "text.kse").write_text("hello")
    with pytest.raises(CheckpointError, match="not a KSE checkpoint"):
        kse.load(tmp_path / "text.kse")
    data = good.read_bytes()
    (tmp_path / "cut.kse").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt|not a KSE checkpoint"):
        kse.load(tmp_path / "cut.kse")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="no 'kse' metadata"):
        kse.load(tmp_path / "plain.safetensors")
    # a newer format version: rewrite the JSON header in place
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    meta = json.loads(header["__metadata__"]["kse"])
    meta["format_version"] = 99
    header["__metadata__"]["kse"] = json.dumps(meta)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    (tmp_path / "new.kse").write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + header_len:])
    with pytest.raises(CheckpointError, match="format version 99, newer than this kse supports"):
        kse.load(tmp_path / "new.kse")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        kse.load(tmp_path / "missing.kse")


def test_save_needs_architecture_and_is_atomic(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="without its architecture"):
        kse.save(nn.Sequential(nn.Conv2d(3, 3, 3)), tmp_path / "x.kse")
    net = get_model("resnet20")
    target = tmp_path / "keep.kse"
    target.write_bytes(b"old")
    import kse.serialization as ser

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        kse.save(net, target)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_profile_index_bits_match_the_file(tmp_path):
    from safetensors import safe_open

    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    kse.save(net, tmp_path / "c.kse")
    with safe_open(str(tmp_path / "c.kse"), "pt") as f:
        for name, m in net.named_modules():
            if isinstance(m, kse.KSEConv2d):
                packed = f.get_tensor(f"{name}.assignment_packed")
                assert packed.numel() == -(-m.out_channels * sum(m.index_bit_widths()) // 8)


def test_malformed_checkpoint_structure(tmp_path):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    path = kse.save(net, tmp_path / "c.kse")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["kse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = json.loads(json.dumps(meta))
    del bad["modules"]["layer1.0.conv2"]["counts"]
    save_file(tensors, str(tmp_path / "bad1.kse"), metadata={"kse": json.dumps(bad)})
    with pytest.raises(CheckpointError, match="module 'layer1.0.conv2' has a malformed description"):
        kse.load(tmp_path / "bad1.kse")
    missing = dict(tensors)
    del missing["layer1.0.conv2.assignment_packed"]
    save_file(missing, str(tmp_path / "bad2.kse"), metadata={"kse": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="packed indices of layer 'layer1.0.conv2' are missing"):
        kse.load(tmp_path / "bad2.kse")
    # the JSON's own shape: every malformed structure gets one CheckpointError naming it
    for i, (edit, what) in enumerate([(lambda m: m.update(modules=[]), "'modules' must map"),
                                      (lambda m: m.pop("arch"), "'arch' must be an object"),
                                      (lambda m: m["arch"].pop("name"), "'arch' must be an object"),
                                      (lambda m: m["arch"].update(kwargs=[1]), "'arch.kwargs'"),
                                      (lambda m: m["modules"].update(x=3), "'modules' must map")]):
        bad = json.loads(json.dumps(meta))
        edit(bad)
        save_file(tensors, str(tmp_path / f"shape{i}.kse"), metadata={"kse": json.dumps(bad)})
        with pytest.raises(CheckpointError, match=f"malformed KSE metadata \\({what}"):
            kse.load(tmp_path / f"shape{i}.kse")
    save_file(tensors, str(tmp_path / "list.kse"), metadata={"kse": json.dumps([meta])})
    with pytest.raises(CheckpointError, match="not a KSE checkpoint"):
        kse.load(tmp_path / "list.kse")


def test_a_pickle_file_gets_a_hint_and_is_never_unpickled(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")  # a zip archive
    with pytest.raises(CheckpointError, match="torch.save \\(pickle\\) file, which kse never unpickles"):
        kse.load(tmp_path / "model.pt")
    import pickle

    (tmp_path / "bare.pkl").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="torch.save \\(pickle\\) file"):
        kse.load(tmp_path / "bare.pkl")


def test_save_refuses_what_load_could_not_rebuild(tmp_path):
    net = get_model("resnet20").eval()
    folded = kse.fold_batchnorm(net)  # BatchNorms gone: the architecture's state dict does not fit
    with pytest.raises(ValueError, match="do not fit architecture 'resnet20' \\(missing: .*bn"):
        kse.save(folded, tmp_path / "f.kse", arch={"name": "resnet20", "kwargs": {}})
    assert not list(tmp_path.iterdir())
    compressed = kse.compress(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    with pytest.raises(ValueError, match="BatchNorm folded into KSE layers"):  # not "without its architecture"
        kse.save(kse.fold_batchnorm(compressed), tmp_path / "g.kse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_round_trip_keeps_the_dtype(tmp_path, dtype):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    net = net.to(dtype)
    back = kse.load(kse.save(net, tmp_path / "d.kse"))
    assert {p.dtype for p in back.parameters()} == {dtype}
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_saved_file_has_the_usual_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        kse.save(get_model("resnet20", num_classes=3, in_channels=1), tmp_path / "m.kse")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.kse").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_a_failed_write_names_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    import os

    net = get_model("resnet20")
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", src)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'm.kse'}: No space left on device") as info:
        kse.save(net, tmp_path / "m.kse")
    assert info.value.errno == 28 and ".tmp" not in str(info.value)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(tmp_path.iterdir())  # the temporary file is gone too
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=f"cannot write {blocker / 'm.kse'}"):
        kse.save(net, blocker / "m.kse")


def test_a_user_model_registered_by_name_saves_and_loads(tmp_path):
    from kse.models import register_model

    class Small(nn.Module):  # a builder takes num_classes and in_channels, then its own arguments
        def __init__(self, num_classes=10, in_channels=3, width=16):
            super().__init__()
            self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    register_model("test_small_user_net")(Small)
    net = get_model("test_small_user_net", num_classes=5, width=24).eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 12, 12)))
    assert sum(isinstance(m, kse.KSEConv2d) for m in net.modules()) == 2
    back = kse.load(kse.save(net, tmp_path / "small.kse"))
    same_outputs(net, back, torch.randn(2, 3, 12, 12))
    assert back.kse_arch == {"name": "test_small_user_net", "kwargs": {"num_classes": 5, "in_channels": 3, "width": 24}}
