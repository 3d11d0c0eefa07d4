"""The XLA:CPU default is added once, never over a user's own setting, and can be switched off."""

from enfpde import _xla


def test_flag_is_added_once_and_respects_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("ENFPDE_KEEP_XLA_FLAGS", raising=False)
    assert _xla.apply_cpu_defaults()
    import os

    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {_xla.FLAG}"
    assert not _xla.apply_cpu_defaults()  # already there
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    assert not _xla.apply_cpu_defaults()  # the user's own choice wins
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("ENFPDE_KEEP_XLA_FLAGS", "1")
    assert not _xla.apply_cpu_defaults() and os.environ["XLA_FLAGS"] == ""
