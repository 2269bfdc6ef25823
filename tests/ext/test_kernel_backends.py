"""Backend selection, status strings, the cache location, and the fallback to torch when a build cannot happen."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from sedac_core import entropy, kernels
from sedac_core.entropy import token_stats_reference


def test_status_lists_every_backend_with_a_reason():
    status = kernels.kernel_status(build=False)
    assert [name for name, _, _ in status] == ["cuda", "cpp", "torch"]
    for name, available, reason in status:
        assert isinstance(available, bool) and reason.startswith(f"{name}: ")
    assert status[-1][1] is True
    if not torch.cuda.is_available():
        assert status[0][1] is False and status[0][2].startswith("cuda: no GPU")


@pytest.mark.skipif(kernels._cxx() is None, reason="no C++ compiler")
def test_active_backend_names_and_reasons():
    name, reason = kernels.active_backend("auto")
    if torch.cuda.is_available():
        assert name == "cuda"
    else:
        assert (name, reason.split(" (")[0]) == ("cpp", "cpp: built")
        name, reason = kernels.active_backend("cuda")  # asked for cuda without a GPU: say so, use the next best
        assert name == "cpp" and reason.startswith("cuda: no GPU") and "cpp: built" in reason
    assert kernels.active_backend("cpp")[0] == "cpp"
    assert kernels.active_backend("torch") == ("torch", "torch: selected in config")
    with pytest.raises(ValueError, match="auto, cuda, cpp, torch"):
        kernels.active_backend("fortran")
    with pytest.raises(ValueError):
        entropy.set_backend("fortran")


def test_build_dir_respects_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build_dir = kernels.KernelManager().cpu_build_dir()
    assert build_dir.parent == tmp_path / "sedac-chat" / "ext"


def _broken_sources(tmp_path):
    src = tmp_path / "ext"
    shutil.copytree(kernels.EXT_DIR, src)
    (src / "stats_common.h").write_text('#error "deliberately broken for the fallback test"\n')
    return src


@pytest.mark.skipif(kernels._cxx() is None, reason="no C++ compiler")
def test_failed_build_falls_back_to_torch_with_one_notice(tmp_path, monkeypatch, caplog):
    broken = kernels.KernelManager(src_dir=_broken_sources(tmp_path), cache_root=tmp_path / "cache")
    monkeypatch.setattr(kernels, "MANAGER", broken)
    x = torch.randn(2, 1000)
    with caplog.at_level(logging.WARNING, logger="sedac.kernels"):
        out = entropy.token_stats(x, 0.5, 4.0)  # must not raise, nor wait: the build runs in the background
        again = entropy.token_stats(x, 0.5, 4.0)
        name, reason = kernels.active_backend("auto")  # waits for that build
        entropy.token_stats(x, 0.5, 4.0)
    ref = token_stats_reference(x, 0.5, 4.0)
    assert torch.equal(out.entropy_bits, ref.entropy_bits) and torch.equal(again.argmax, ref.argmax)
    notices = [r for r in caplog.records if r.name == "sedac.kernels"]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert "cpp: build failed" in notices[0].getMessage()
    assert name == "torch" and "cpp: build failed" in reason and reason.endswith("using torch")
    cpp = [s for s in kernels.kernel_status() if s[0] == "cpp"][0]
    assert cpp[1] is False and "deliberately broken" in cpp[2]


def test_no_compiler_means_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_cxx", lambda: None)
    manager = kernels.KernelManager(cache_root=tmp_path)
    monkeypatch.setattr(kernels, "MANAGER", manager)
    assert kernels.active_backend("cpp") == ("torch", "cpp: no compiler, using torch")
    assert kernels.kernel_status(build=False)[1] == ("cpp", False, "cpp: no compiler, using torch")
    x = torch.randn(2, 100)
    assert torch.equal(entropy.token_stats(x).entropy_bits, token_stats_reference(x, 0.0, float("inf")).entropy_bits)


def test_missing_sources_means_torch(tmp_path):
    manager = kernels.KernelManager(src_dir=tmp_path / "nowhere", cache_root=tmp_path)
    res = manager.cpu()
    assert not res.ok and "sources not found" in res.reason
    assert manager.kernel_for(torch.randn(2, 10)) is None


def test_reference_leaves_masked_tokens_out():
    """The torch reference (what runs without a kernel) treats -inf logits as probability 0, as the kernels do: a
    row with masked tokens has the statistics of the row without them, one finite entry has entropy 0 (an exit)."""
    import math

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen) * 2
    x[0, ::3] = -math.inf
    x[1, :] = -math.inf
    x[1, 17] = 2.0
    ref = token_stats_reference(x, 0.5, 4.0)
    kept = token_stats_reference(x[0][x[0] > -math.inf], 0.5, 4.0)
    torch.testing.assert_close(ref.entropy_bits[0], kept.entropy_bits)
    torch.testing.assert_close(ref.varentropy[0], kept.varentropy)
    assert float(ref.entropy_bits[1]) == 0.0 and int(ref.decision[1]) == entropy.DECISION_EXIT
    assert float(ref.max_prob[1]) == 1.0 and int(ref.argmax[1]) == 17
    assert torch.isfinite(ref.entropy_bits).all()
