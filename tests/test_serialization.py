"""The .kse format: round trips (dense, compressed, reshaped), index packing, bad files."""

import json
import numpy as np
import struct

import pytest
import torch
import torch.nn as nn

import kse
from kse.models import get_model
from kse.dead_channels import shrink_batchnorm, shrink_conv
from kse.serialization import CheckpointError, checksum, index_bit_widths, pack_indices, read_metadata, unpack_indices
from safetensors import safe_open
from safetensors.torch import save_file


def read_file(path):
    """``(metadata, tensors)`` of a .kse file, as stored."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["kse"]), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, out, edit, sign=True):
    """A copy of ``path`` at ``out`` after ``edit(meta, tensors)`` (in place), with a valid
    checksum (``sign``) as a careful forger would write it, so that the structural checks
    rather than the checksum must catch the edit."""
    meta, tensors = read_file(path)
    edit(meta, tensors)
    if sign and "checksum" in meta:
        meta["checksum"] = checksum(meta, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"kse": json.dumps(meta)})
    return out


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
    assert json.loads(json.dumps(read_metadata(tmp_path / "c.kse")))["format_version"] == 2


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
    import safetensors.torch
    from safetensors import SafetensorError

    def broken(tensors, filename, metadata=None):  # what safetensors raises on a full disk
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device") as info:
        kse.save(net, target)
    assert info.value.errno == 28  # an OSError, which the command line reports as an expected error (exit 2)
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
                assert packed.numel() == -(-m.out_channels * sum(index_bit_widths(m)) // 8)


def test_malformed_checkpoint_structure(tmp_path):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    path = kse.save(net, tmp_path / "c.kse")

    def drop_counts(meta, tensors):
        del meta["modules"]["layer1.0.conv2"]["counts"]

    with pytest.raises(CheckpointError, match="module 'layer1.0.conv2' has a malformed description \\(counts: missing"):
        kse.load(rewrite(path, tmp_path / "bad1.kse", drop_counts))

    def drop_packed(meta, tensors):
        del tensors["layer1.0.conv2.assignment_packed"]

    with pytest.raises(CheckpointError, match="packed indices of layer 'layer1.0.conv2' are missing"):
        kse.load(rewrite(path, tmp_path / "bad2.kse", drop_packed))
    # the JSON's own shape: every malformed structure gets one CheckpointError naming it
    for i, (edit, what) in enumerate([(lambda m: m.update(modules=[]), "'modules' must map"),
                                      (lambda m: m.pop("arch"), "'arch' must be an object"),
                                      (lambda m: m["arch"].pop("name"), "'arch' must be an object"),
                                      (lambda m: m["arch"].update(kwargs=[1]), "'arch.kwargs'"),
                                      (lambda m: m["modules"].update(x=3), "'modules' must map")]):
        bad = rewrite(path, tmp_path / f"shape{i}.kse", lambda meta, tensors: edit(meta))
        with pytest.raises(CheckpointError, match=f"malformed KSE metadata \\({what}"):
            kse.load(bad)
    meta, tensors = read_file(path)
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


# ----------------------------------------------------------------------------- what load checks (issue 18)
LAYER = "layer2.1.conv1"


@pytest.fixture(scope="module")
def compressed_file(tmp_path_factory):
    """A compressed ResNet-20 saved in the fused form (the form that reads indices unchecked)."""
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=4, input_size=(3, 32, 32)))
    kse.deploy_(net, form="split")
    return kse.save(net, tmp_path_factory.mktemp("files") / "c.kse")


def _buffer_edit(key, fn):
    def edit(meta, tensors):
        tensors[f"{LAYER}.{key}"] = fn(tensors[f"{LAYER}.{key}"].clone())
    return edit


def _spec_edit(fn):
    def edit(meta, tensors):
        fn(meta["modules"][LAYER])
    return edit


def _both_kept(fn):
    """The same edit to the JSON's kept channels and the buffer, so that they agree."""
    def edit(meta, tensors):
        kept = fn(list(meta["modules"][LAYER]["kept"]))
        meta["modules"][LAYER]["kept"] = kept
        tensors[f"{LAYER}.kept_channels"] = torch.tensor(kept)
    return edit


def _swap_first_two(values):
    values[0], values[1] = values[1], values[0]
    return values


@pytest.mark.parametrize("edit,message", [
    (_buffer_edit("kept_channels", lambda k: k.flip(0)), "kept_channels tensor disagrees with the description"),
    (_buffer_edit("kept_channels", lambda k: k.index_fill_(0, torch.tensor([1]), int(k[0]))),
     "kept_channels tensor disagrees"),
    (_buffer_edit("centroid_counts", lambda c: c.flip(0)), "centroid_counts tensor disagrees"),
    (_both_kept(lambda k: k[::-1]), "kept must list distinct input channels in increasing order"),
    (_both_kept(lambda k: [k[0]] + k[:-1]), "kept must list distinct input channels in increasing order"),
    (_both_kept(lambda k: [-1] + k[1:]), "kept must be an integer in \\[0, 31\\], got -1"),
    (_spec_edit(lambda s: s["index_bits"].__setitem__(s["index_bits"].index(4), 64)),
     "index_bits must be an integer in \\[0, 31\\], got 64"),
    (_spec_edit(lambda s: s["index_bits"].__setitem__(s["index_bits"].index(4), 1)),
     "index_bits\\[\\d+\\] = 1 does not fit 16 centroids of 32 kernels \\(expected 4\\)"),
    (_spec_edit(lambda s: s.update(padding="bogus")), "padding must be 'same', 'valid' or a list of 2 integers, got 'bogus'"),
    (_spec_edit(lambda s: s.update(form="fast")), "form: form must be one of"),
    (_buffer_edit("assignment_packed", lambda p: p.float()), "'assignment_packed' is torch.float32, expected torch.uint8"),
    (_buffer_edit("assignment_packed", lambda p: p[:-1]), "'assignment_packed' has shape"),
    (_buffer_edit("kept_channels", lambda k: k.int()), "'kept_channels' is torch.int32, expected torch.int64"),
])
def test_load_checks_every_structural_value(compressed_file, tmp_path, edit, message):
    """Each edit is signed with a valid checksum: the structural check itself must refuse it."""
    with pytest.raises(CheckpointError, match=message):
        kse.load(rewrite(compressed_file, tmp_path / "bad.kse", edit))


def test_permuted_counts_in_json_and_buffer_are_caught(compressed_file, tmp_path):
    """Counts permuted consistently in the JSON and the buffer: the index widths or the
    indices no longer fit them."""
    def permute(meta, tensors):
        spec = meta["modules"][LAYER]
        pos = [spec["counts"].index(q) for q in sorted(set(spec["counts"]))][:2]  # two channels, different q
        for key in ("counts",):
            values = spec[key]
            values[pos[0]], values[pos[1]] = values[pos[1]], values[pos[0]]
        tensors[f"{LAYER}.centroid_counts"] = torch.tensor(spec["counts"])

    with pytest.raises(CheckpointError, match="does not fit|centroids"):
        kse.load(rewrite(compressed_file, tmp_path / "bad.kse", permute))


def test_index_widths_beyond_31_bits_are_refused():
    """A 64-bit width could hold a negative value (-2^32 + 1 wraps to a valid int32 row)."""
    value = -(2**32) + 1
    packed = torch.from_numpy(np.frombuffer(np.array([value], dtype="<i8").tobytes(), dtype=np.uint8).copy())
    with pytest.raises(CheckpointError, match="index widths must be in \\[0, 31\\] bits"):
        unpack_indices(packed, [64], [4], 1)
    with pytest.raises(CheckpointError, match="1-D uint8"):
        unpack_indices(packed.float(), [8], [4], 1)
    with pytest.raises(CheckpointError, match="hold 8 bytes, expected 1"):
        unpack_indices(packed, [2], [4], 4)


def test_a_flipped_bit_is_a_checksum_error(compressed_file, tmp_path):
    def flip(meta, tensors):
        w = tensors["layer1.0.bn1.weight"].clone()
        w.view(torch.int32)[0] ^= 1  # the lowest mantissa bit
        tensors["layer1.0.bn1.weight"] = w

    with pytest.raises(CheckpointError, match="is damaged: its checksum does not match its contents"):
        kse.load(rewrite(compressed_file, tmp_path / "flip.kse", flip, sign=False))

    def eps(meta, tensors):
        meta["modules"].setdefault("bn1", {"type": "BatchNorm2d", "num_features": 16, "eps": 0.1, "momentum": 0.1,
                                           "affine": True, "track_running_stats": True})

    with pytest.raises(CheckpointError, match="checksum does not match"):  # the metadata is covered too
        kse.load(rewrite(compressed_file, tmp_path / "eps.kse", eps, sign=False))

    def strip(meta, tensors):
        del meta["checksum"]

    with pytest.raises(CheckpointError, match="format 2 needs a 'checksum'"):
        kse.load(rewrite(compressed_file, tmp_path / "strip.kse", strip, sign=False))


def test_the_checksum_holds_for_any_json_extra(tmp_path):
    """Integer keys and tuples become strings and lists in JSON: the checksum is of what load reads."""
    net = get_model("resnet20", num_classes=3).eval()
    back = kse.load(kse.save(net, tmp_path / "x.kse", extra={1: (2, 3), "b": {"c": None}}))
    assert back.kse_extra == {"1": [2, 3], "b": {"c": None}}


def test_files_of_format_1_load_without_a_checksum(compressed_file, tmp_path):
    """Format 1 (the committed checkpoints/*.kse) was written before the checksum."""
    def as_format_1(meta, tensors):
        meta["format_version"] = 1
        del meta["checksum"], meta["module_versions"]

    old = kse.load(rewrite(compressed_file, tmp_path / "v1.kse", as_format_1))
    same_outputs(old, kse.load(compressed_file), torch.randn(2, 3, 32, 32))


def test_the_committed_checkpoints_load():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "checkpoints").glob("*.kse"))
    assert len(files) >= 5
    for path in files:
        model = kse.load(path)
        size = model.kse_preprocess["input_size"]
        assert model(torch.zeros(1, *size)).shape == (1, 10)


def test_sizes_are_checked_against_the_tensors_before_anything_is_built(compressed_file, tmp_path):
    """A small file claiming huge sizes is refused before the loader allocates them (without the
    check these allocate hundreds of gigabytes and fail with a raw allocation error)."""
    def huge_conv(meta, tensors):
        meta["modules"]["conv1"] = {"type": "Conv2d", "in_channels": 3, "out_channels": 200_000_000,
                                    "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                                             "dilation": [1, 1], "groups": 1, "bias": False, "padding_mode": "zeros"}

    with pytest.raises(CheckpointError, match="module 'conv1' does not fit its tensors \\(other shapes: weight"):
        kse.load(rewrite(compressed_file, tmp_path / "a.kse", huge_conv))

    def many_classes(meta, tensors):
        meta["arch"]["kwargs"]["num_classes"] = 2_000_000_000

    with pytest.raises(CheckpointError, match="tensors do not match the architecture \\(other shapes: fc.bias, fc.weight"):
        kse.load(rewrite(compressed_file, tmp_path / "b.kse", many_classes))

    def wide_kse_layer(meta, tensors):  # one centroid per channel, no bias: no tensor grows with out_channels
        spec = meta["modules"][LAYER]
        k = len(spec["kept"])
        spec.update(out_channels=200_000_000, counts=[1] * k, index_bits=[0] * k)
        tensors[f"{LAYER}.centroid_counts"] = torch.ones(k, dtype=torch.long)
        tensors[f"{LAYER}.centroids"] = torch.zeros(k, 3, 3)
        tensors[f"{LAYER}.assignment_packed"] = torch.zeros(0, dtype=torch.uint8)

    with pytest.raises(CheckpointError, match=f"KSE layer '{LAYER}' has 32 -> 200000000 channels, more than the "
                                              "convolution it replaces"):
        kse.load(rewrite(compressed_file, tmp_path / "c.kse", wide_kse_layer))


def _deep(meta, tensors):
    meta["extra"] = json.loads("[" * 5000 + "]" * 5000)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["modules"][LAYER].update(in_channels=10**12), "in_channels must be an integer in \\[1, 2147483647\\]"),
    (lambda m: m["modules"][LAYER].update(out_channels=1e12), "out_channels must be an integer"),
    (lambda m: m["modules"][LAYER]["index_bits"].pop(), "index_bits has (\\d+) values for \\d+ kept channels"),
    (lambda m: m["modules"][LAYER]["index_bits"].__setitem__(0, -1), "index_bits must be an integer in \\[0, 31\\]"),
    (lambda m: m["arch"]["kwargs"].update(num_classes=1e30), "'arch.kwargs.num_classes' must be an integer"),
    (lambda m: m["arch"]["kwargs"].update(width=10**30), "'arch.kwargs.width' must be an integer of at most"),
    (lambda m: m.update(preprocess=[1, 28, 28]), "'preprocess' must be an object or null"),
    (lambda m: m["preprocess"].update(num_classes=1e30), "'preprocess.num_classes' must be an integer"),
    (lambda m: m["preprocess"].update(input_size=[3, 0, 32]), "'preprocess.input_size' must be \\[C, H, W\\]"),
    (lambda m: m["preprocess"].update(input_size=[3, -32, 32]), "'preprocess.input_size' must be"),
    (lambda m: m["preprocess"].update(input_size=[3, 60000, 60000]), "C \\* H \\* W <= 268435456"),
    (lambda m: m["preprocess"].update(std=[0.0]), "'preprocess.std' must be a finite number in \\(0"),
    (lambda m: m.update(format_version="1"), "'format_version' must be an integer >= 1, got '1'"),
    (lambda m: m.pop("format_version"), "'format_version' must be an integer >= 1, got none"),
    (lambda m: m.update(kse_config={"G": 4, "T": 10**30}), "'kse_config': T must be an integer <= 1048576"),
    (lambda m: m.update(module_versions={"layer1": "2"}), "'module_versions.layer1' must be an integer"),
    (lambda m: m.update(module_versions={"nowhere": 2}), "'module_versions' names 'nowhere'"),
    (_deep, "nested too deeply"),
])
def test_malformed_metadata_is_one_clear_error(compressed_file, tmp_path, edit, message):
    def apply(meta, tensors):
        if edit is _deep:
            _deep(meta, tensors)
        else:
            meta.setdefault("preprocess", {"input_size": [3, 32, 32]})
            if meta["preprocess"] is None:
                meta["preprocess"] = {"input_size": [3, 32, 32]}
            edit(meta)

    if edit is _deep:  # beyond what the json module can build: written as text
        meta, tensors = read_file(compressed_file)
        raw = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}"
        save_file(tensors, str(tmp_path / "bad.kse"), metadata={"kse": raw})
        bad = tmp_path / "bad.kse"
    else:
        bad = rewrite(compressed_file, tmp_path / "bad.kse", apply)
    with pytest.raises(CheckpointError, match=message):
        kse.load(bad)


@pytest.mark.parametrize("key,value", [("weights", "DEFAULT"), ("weights_backbone", "DEFAULT"),
                                       ("pretrained", True), ("progress", True), ("model_dir", "/tmp"),
                                       ("checkpoint_path", "a.pth"), ("cfg", "https://example.com/w.pth")])
def test_architecture_arguments_that_fetch_are_refused(compressed_file, tmp_path, key, value, monkeypatch):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("kse.load tried to fetch weights")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)
    bad = rewrite(compressed_file, tmp_path / "bad.kse", lambda m, t: m["arch"]["kwargs"].update({key: value}))
    with pytest.raises(CheckpointError, match=f"'arch.kwargs.{key}'.*(fetch or read data|not a URL)"):
        kse.load(bad)
    # null or false is harmless
    if key != "cfg":
        ok = rewrite(compressed_file, tmp_path / "ok.kse", lambda m, t: m["arch"]["kwargs"].update({key: None}))
        with pytest.raises(CheckpointError, match=f"cannot build architecture 'resnet20' .*unexpected keyword argument '{key}'"):
            kse.load(ok)


def test_weights_argument_is_left_out_of_the_file(tmp_path):
    """A torchvision model built with weights= saves without them in its arguments (the tensors
    hold them); what they set on the model (googlenet's transform_input) is kept."""
    net = get_model("googlenet", num_classes=10, transform_input=True, aux_logits=False, init_weights=False).eval()
    net.kse_arch["kwargs"] = {"num_classes": 10, "in_channels": 3, "weights": "DEFAULT", "aux_logits": False,
                              "init_weights": False}  # as if built with weights=
    path = kse.save(net, tmp_path / "g.kse")
    kwargs = read_metadata(path)["arch"]["kwargs"]
    assert "weights" not in kwargs and kwargs["transform_input"] is True
    same_outputs(net, kse.load(path), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="'arch.kwargs.cfg' must be a short string \\(not a URL\\)"):
        kse.save(net, tmp_path / "h.kse", arch={"name": "googlenet", "kwargs": {"cfg": "http://x"}})


def test_mnasnet_round_trips_with_its_module_versions(tmp_path):
    """torchvision's MNASNet reads the state dict's module versions (_metadata) when it loads."""
    net = get_model("mnasnet0_5", num_classes=10).eval()
    path = kse.save(net, tmp_path / "m.kse")
    assert read_metadata(path)["module_versions"][""] == 2  # MNASNet._version
    same_outputs(net, kse.load(path), torch.randn(1, 3, 64, 64))
