"""deploy_: forms equal the training form on whole models; choice is recorded."""

import pytest
import torch

import kse
from kse.models import get_model


@pytest.mark.parametrize("form", ["dense", "full", "split", "auto"])
def test_deploy_whole_model_matches_training_form(form):
    net = get_model("resnet20").eval()
    kse.compress_(net, kse.KSEConfig(G=5, input_size=(3, 32, 32)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        chosen = kse.deploy_(net, form=form, input_size=(3, 32, 32))
        out = net(x)
    assert set(chosen.values()) <= {"dense", "full", "split"}
    assert all(net.get_submodule(n).form == f for n, f in chosen.items())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    kse.deploy_(net, form="train")
    assert all(m.form == "train" for m in net.modules() if isinstance(m, kse.KSEConv2d))


def test_deploy_errors():
    with pytest.raises(ValueError, match="no KSE layer"):
        kse.deploy_(get_model("resnet20"))
    net = get_model("resnet20")
    kse.compress_(net, kse.KSEConfig(input_size=(3, 32, 32)))
    with pytest.raises(ValueError, match="form must be"):
        kse.deploy_(net, form="fast")
    with pytest.raises(ValueError, match="needs input_size"):
        kse.deploy_(net, form="auto")


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


def test_auto_deploy_over_several_batch_sizes(monkeypatch):
    import kse.deploy as deploy_mod

    net = kse.compress(get_model("resnet20", num_classes=10, in_channels=1).eval(),
                       kse.KSEConfig(G=4, input_size=(1, 16, 16)))
    # a fake clock: "dense" wins at batch 1 by a little and loses at batch 8 by a lot, so the
    # form chosen over both sizes is "full" (relative times 1.1 + 1.0 against 1.0 + 3.0)
    fake = {("dense", 1): 1.0, ("full", 1): 1.1, ("split", 1): 5.0,
            ("dense", 8): 3.0, ("full", 8): 1.0, ("split", 8): 5.0}
    monkeypatch.setattr(deploy_mod, "time_call",
                        lambda m, x, warmup, repeats: {"min_ms": fake[(m.form, x.shape[0])]})
    assert set(kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=1).values()) == {"dense"}
    assert set(kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=(1, 8)).values()) == {"full"}
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        kse.deploy_(net, form="auto", input_size=(1, 16, 16), batch_size=(1, 0))
