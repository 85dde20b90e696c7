"""--amp on CPUs: bf16 autocast only where the CPU runs bf16 natively, unless forced; the decision is
said once on stderr and recorded in config.json.

The detection is forced both ways with CNNLAB_CPU_BF16, so these tests mean the same on any CPU.
"""

import json
import logging

import pytest
import torch
import torch.nn as nn

from cnnlab.cli import main
from cnnlab.config import resolve
from cnnlab.core.errors import UserError
from cnnlab.train.device import BF16_ENV, amp_choice, bf16_is_native, cpu_bf16, use_amp

TINY = ["train", "--dataset", "sample", "--model", "resnet18-cifar", "--width", "4", "--image-size", "32",
        "--epochs", "1", "--limit-train", "128", "--limit-test", "32", "--device", "cpu"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
NOTE = "note: --amp is ignored, training in fp32"


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX2", {"avx2", "fma"}, False),  # the machine of the report: AVX2-only AMD EPYC
    ("AVX512", {"avx512f", "avx512bw"}, False),  # AVX-512 without its bf16 extension (e.g. Skylake-SP)
    ("AVX512", {"avx512f", "avx512_bf16"}, True),  # e.g. Zen 4, Cooper Lake
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),  # AMX, e.g. Sapphire Rapids
    ("AVX2", {"avx512f", "avx512_bf16"}, False),  # instructions there, but ATEN_CPU_CAPABILITY=avx2 caps torch
    ("DEFAULT", set(), False),
])
def test_bf16_is_native_needs_the_instructions_and_torchs_avx512_kernels(capability, flags, native):
    assert bf16_is_native(capability, flags) is native


def test_detection_reports_this_cpu_and_honours_the_override(monkeypatch):
    monkeypatch.delenv(BF16_ENV, raising=False)
    detected = cpu_bf16()
    assert detected["capability"] == torch.backends.cpu.get_cpu_capability()
    assert detected["model"] and "set_by" not in detected
    assert detected["bf16_native"] is bf16_is_native(detected["capability"], set(detected["bf16_flags"]))
    for value, native in (("0", False), ("1", True)):
        monkeypatch.setenv(BF16_ENV, value)
        forced = cpu_bf16()
        assert forced["bf16_native"] is native and forced["set_by"] == f"{BF16_ENV}={value}"
        assert forced["capability"] == detected["capability"]  # the override changes the verdict only
    monkeypatch.setenv(BF16_ENV, "yes")
    with pytest.raises(UserError, match=f"{BF16_ENV} must be 1 .* or 0"):
        cpu_bf16()


@pytest.mark.parametrize("native", ["0", "1"])
def test_amp_choice(monkeypatch, native):
    monkeypatch.setenv(BF16_ENV, native)

    def used(setting, device):
        return amp_choice(setting, device)["used"]

    # The default, off and CUDA do not depend on the CPU.
    assert used(None, CPU) == used(False, CPU) == used(False, CUDA) == "fp32"
    assert used(None, CUDA) == used(True, CUDA) == used("force", CUDA) == "bf16"
    assert used("force", CPU) == "bf16"
    on_cpu = amp_choice(True, CPU)
    assert on_cpu["used"] == ("bf16" if native == "1" else "fp32")
    assert on_cpu["asked"] == "on" and on_cpu["cpu"]["bf16_native"] is (native == "1")
    assert ("has no native bf16" in on_cpu["why"]) is (native == "0")


def test_the_note_is_for_an_asked_for_amp_only(monkeypatch, caplog):
    monkeypatch.setenv(BF16_ENV, "0")
    caplog.set_level(logging.INFO, logger="cnnlab")
    assert use_amp(None, CPU) is False and use_amp(False, CPU) is False and use_amp("force", CPU) is True
    assert caplog.messages == []
    assert use_amp(True, CPU) is False
    (note,) = caplog.messages
    # The library names its parameter; the command line (below) spells it as the flag.
    assert note.startswith(NOTE.replace("--amp", "`amp`")) and len(note.splitlines()) == 1 and "--amp force" in note


@pytest.fixture
def conv_dtypes():
    """The dtype of every convolution's output while the test runs, training and scoring alike (not the
    shape-only probe of the input size on the meta device)."""
    seen = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d) and output.device.type != "meta":
            seen.append(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.mark.parametrize("native, flag, used", [
    ("0", ["--amp"], "fp32"),
    ("1", ["--amp"], "bf16"),
    ("0", ["--amp", "force"], "bf16"),
    ("0", [], "fp32"),  # the default: off on CPUs, without a note
])
def test_training_on_a_cpu(tmp_path, monkeypatch, capsys, conv_dtypes, native, flag, used):
    monkeypatch.setenv(BF16_ENV, native)
    assert main([*TINY, *flag, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert (NOTE in err) is (flag == ["--amp"] and native == "0"), err
    assert err.count(NOTE) <= 1
    record = json.loads((tmp_path / "run" / "config.json").read_text())["amp"]
    assert record["used"] == used
    assert record["asked"] == {(): "default", ("--amp",): "on", ("--amp", "force"): "force"}[tuple(flag)]
    # What the network computed in: every convolution of the run, not just what the record claims.
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16 if used == "bf16" else torch.float32}


@pytest.mark.parametrize("toml, value", [("true", True), ("false", False), ('"force"', "force")])
def test_toml_amp(tmp_path, toml, value):
    path = tmp_path / "c.toml"
    path.write_text(f"amp = {toml}\n")
    assert resolve(toml_path=path).amp == value


@pytest.mark.parametrize("argv", [["--amp", "maybe"], ["--amp=on"], ["--amp="], ["--no-amp=force"]])
def test_amp_refuses_other_values_in_one_line(tmp_path, capsys, argv):
    try:
        code = main([*TINY, *argv, "--out", str(tmp_path / "run")])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cnnlab train: error:") and "amp" in err, err
    assert not (tmp_path / "run").exists()


def test_toml_amp_refuses_other_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('amp = "on"\n')
    with pytest.raises(UserError, match='`amp` must be true, false or "force"'):
        resolve(toml_path=path)
