"""deploy_: forms equal the training form on whole models; choice is recorded."""

import pytest
import torch

import kse
from kse.models import get_model



@pytest.mark.parametrize("form", ["dense", "full", "split", "auto"])
def test_deploy_whole_model_matches_training_form(form, assert_same_function):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=5, input_size=(3, 32, 32)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        chosen = kse.deploy_(net, form=form, input_size=(3, 32, 32))
        out = net(x)
    assert set(chosen.values()) <= {"dense", "full", "split"}
    assert all(net.get_submodule(n).form == f for n, f in chosen.items())
    assert_same_function(out, ref)
    kse.deploy_(net, form="train")
    assert all(m.form == "train" for m in net.modules() if isinstance(m, kse.KSEConv2d))


def test_deploy_errors():
    with pytest.raises(ValueError, match="no KSE layer"):
        kse.deploy_(get_model("resnet20"))
    net = get_model("resnet20")
    kse.compress_(net, kse.KSEConfig())  # no input size recorded anywhere
    with pytest.raises(ValueError, match="form must be"):
        kse.deploy_(net, form="fast")
    with pytest.raises(ValueError, match=r"not recorded on this model: pass input_size=\(C, H, W\)"):
        kse.deploy_(net)
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="memory_factor must be a number >= 1"):
            kse.deploy_(net, input_size=(3, 32, 32), memory_factor=bad)


def test_failed_auto_deploy_restores_forms(monkeypatch):
    import kse.deploy as dep

    net = get_model("resnet20")
    kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32)))
    net.train()

    def boom(*a, **k):
        raise RuntimeError("timer broke")

    monkeypatch.setattr(dep, "time_call", boom)
    with pytest.raises(RuntimeError, match="timer broke"):
        kse.deploy_(net, form="auto", input_size=(3, 32, 32))
    assert net.training and all(m.form == "train" for m in net.modules() if isinstance(m, kse.KSEConv2d))


def test_auto_deploy_over_several_batch_sizes(monkeypatch, tiny_kse):
    import kse.deploy as deploy_mod

    net = tiny_kse()
    # a fake clock: "dense" wins at batch 1 by a little and loses at batch 8 by a lot, so the
    # form chosen over both sizes is "full" (relative times 1.1 + 1.0 against 1.0 + 3.0)
    fake = {("dense", 1): 1.0, ("full", 1): 1.1, ("split", 1): 5.0,
            ("dense", 8): 3.0, ("full", 8): 1.0, ("split", 8): 5.0}
    monkeypatch.setattr(deploy_mod, "time_call",
                        lambda m, x, warmup, repeats: {"min_ms": fake[(m.form, x.shape[0])]})
    assert set(kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=1).values()) == {"dense"}
    assert set(kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=(1, 8),
                           per_batch=False).values()) == {"full"}
    # per batch size (the default): the best form at each size, and inputs dispatched by size
    chosen = kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=(1, 8))
    assert set(chosen.values()) == {"dense@1,full@8"}
    layer = net.get_submodule(next(iter(chosen)))
    assert [layer.form_for_batch(b) for b in (1, 2, 3, 4, 64)] == ["dense", "dense", "full", "full", "full"]
    for bad in [(1, 0), (1, 1)]:
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=bad)


def test_auto_deploy_measures_in_the_models_memory_format(monkeypatch, assert_same_function):
    import kse.deploy as deploy_mod

    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=5, input_size=(3, 32, 32)))
    seen = []

    def clock(m, x, warmup, repeats):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return {"min_ms": {"dense": 2.0, "full": 1.0, "split": 3.0}[m.form]}

    monkeypatch.setattr(deploy_mod, "time_call", clock)
    assert not deploy_mod.model_is_channels_last(net)
    kse.deploy_(net, form="auto", input_size=(3, 32, 32))
    assert seen and not any(seen)
    net = net.to(memory_format=torch.channels_last)
    assert deploy_mod.model_is_channels_last(net)
    seen.clear()
    kse.deploy_(net, form="auto", input_size=(3, 32, 32))
    assert seen and all(seen)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_function(net(x.contiguous(memory_format=torch.channels_last)), net(x))


def test_form_per_batch_size_runs_each_form_and_is_saved(tmp_path, monkeypatch, tiny_kse, assert_same_function):
    import dataclasses

    import kse.forms
    from kse.conv import KSEConv2d

    net = tiny_kse()
    x = torch.randn(6, 1, 16, 16)
    used = []
    split = kse.forms.REGISTRY["split"]
    monkeypatch.setitem(kse.forms.REGISTRY, "split", dataclasses.replace(
        split, run=lambda t, x: used.append(len(x)) or split.run(t, x)))
    with torch.no_grad():
        ref = net(x)
        kse.deploy_(net, form="split@1,dense@4")
        out_small, out_big = net(x[:2]), net(x)  # 2 <= sqrt(1 * 4): split; 6: dense
    assert used and set(used) == {2}
    assert_same_function(out_small, ref[:2])
    assert_same_function(out_big, ref)
    kse.save(net, tmp_path / "m.kse")
    back = kse.load(tmp_path / "m.kse")
    assert {m.form for m in back.modules() if isinstance(m, KSEConv2d)} == {"split@1,dense@4"}
    for bad, msg in [("split@4,dense@1", "must increase"), ("dense@0", "each part"), ("train@1,dense@2", "each part"),
                     ("quick", "form must be one of")]:
        with pytest.raises(ValueError, match=msg):
            kse.deploy_(net, form=bad)
