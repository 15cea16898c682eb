"""`devices.host_waits`: the place a call makes the host wait is named by its innermost package frame."""

import warnings

import torch

from hf_squeeze import devices


def test_host_waits_names_the_innermost_frame_of_the_packages(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)  # (a CPU build has no CUDA)

    def wait():  # stands for an operation that synchronises: torch warns in "warn" mode
        warnings.warn("called a synchronizing CUDA operation")

    def caller():
        wait()
        wait()

    sites = devices.host_waits(caller, packages=("tests",))
    assert modes == ["warn", "default"]
    line = wait.__code__.co_firstlineno + 1
    assert sites == {f"tests/test_devices.py:{line} wait": 2}
    assert devices.host_waits(lambda: None) == {}
    # outside the packages: the innermost frame of all
    assert list(devices.host_waits(caller, packages=("no such package",))) == [f"tests/test_devices.py:{line} wait"]
