"""Exporting a trained model to ONNX, torch.export (``.pt2``) or TorchScript for use outside cnnlab.

The exported model takes what a user has after decoding an image: **float32 pixels in [0, 1]**,
shape (N, C, image_size, image_size), RGB (or one gray channel), any batch size. Normalisation by the
run's mean and std is part of the graph; the output is the (N, num_classes) **logits** (apply softmax
for probabilities). Resize the image to image_size first — cnnlab itself uses a bilinear resize
(``align_corners=False``), see ``cnnlab.predict``.

The file also carries what is needed to use it, as JSON strings under these keys: ``classes``,
``image_size``, ``in_channels``, ``mean``, ``std``, ``flip_tta``, ``tta``, ``input``, ``output``,
``model``, ``cnnlab_version``. In ONNX they are the model's ``metadata_props`` (onnxruntime:
``session.get_modelmeta().custom_metadata_map``); in a ``.pt2`` ExportedProgram and in TorchScript they
are one extra file, ``metadata.json`` (``torch.export.load(path, extra_files={"metadata.json": ""})``,
``torch.jit.load(path, _extra_files={"metadata.json": ""})``). Neither needs cnnlab to load.

TorchScript is deprecated in torch (every trace, save and load warns); torch.export is its successor,
and the TorchScript export stays while torch ships it.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import cnnlab
from cnnlab import run
from cnnlab.config import TTA_NAMES
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write

FORMATS = ("onnx", "pt2", "torchscript")
SUFFIXES = {"onnx": "onnx", "pt2": "pt2", "torchscript": "pt"}
INPUT = "image"
OUTPUT = "logits"
METADATA_FILE = "metadata.json"  # the extra file of .pt2 and TorchScript archives
INPUT_CONVENTION = ("float32 (N, C, image_size, image_size), RGB (or gray) pixels in [0, 1]; "
                    "normalisation by mean/std is inside the model")

Runner = Callable[[torch.Tensor], torch.Tensor]


def export(path: str | Path, format: str, out: str | Path) -> dict[str, Any]:  # noqa: A002 - the CLI's name
    """Write the model of a run folder or checkpoint to ``out`` as ONNX, a torch.export ``.pt2`` archive
    or TorchScript.

    The export is checked before it is kept: the exported file is run on a random batch (of another size
    than the one it was exported with) and must agree with PyTorch within 1e-4.
    Returns ``{"out", "format", "metadata", "max_abs_diff"}``.
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"`out` {out} is a folder; give the file to write, e.g. {out / ('model.' + SUFFIXES[format])}")
    loaded = run.load(path, device="cpu")
    pre = loaded.preprocess
    channels, size = pre.channels, pre.size
    wrapped = nn.Sequential(pre.normalizer(), loaded.model).eval()
    metadata = {
        "classes": loaded.classes, "image_size": size, "in_channels": channels,
        "mean": list(pre.mean), "std": list(pre.std),
        "input": INPUT_CONVENTION, "output": f"float32 (N, {len(loaded.classes)}) logits, in the order of classes",
        "model": loaded.spec.name, "cnnlab_version": cnnlab.__version__,
        # The file holds one view. ``tta`` says how the run scored: "none"; "flip", the mean of the logits of
        # x and x.flip(-1); "translate", airbench's six views (cnnlab.core.metrics.logits). Both of the last
        # two mirror, so ``flip_tta`` is true for either.
        "flip_tta": bool(loaded.tta),
        "tta": TTA_NAMES[loaded.tta],
    }
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    # Exported to bytes and checked from those bytes before anything is written.
    write, runner = EXPORTERS[format]
    data = write(wrapped, example, metadata)
    run_exported = runner(data)
    check = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (run_exported(check) - wrapped(check)).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(f"the exported {format} model differs from PyTorch by {diff:.3g} (over 1e-4)")
    try:
        atomic_write(out, data)
    except OSError as e:
        raise UserError(f"cannot write `out` {out}: {e.strerror or e}") from None
    return {"out": str(out), "format": format, "metadata": metadata, "max_abs_diff": diff}


def _onnx(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    try:
        import onnx  # noqa: F401 - torch.onnx needs it, and it writes the metadata
        import onnxscript  # noqa: F401 - the torch.export-based exporter is built on it
    except ImportError as e:
        raise UserError(f"ONNX export needs the {e.name} package: pip install 'cnnlab[export]'") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about opset versions and deprecations
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT],
                                    output_names=[OUTPUT], verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.doc_string = f"cnnlab {metadata['model']}: input {INPUT_CONVENTION}; output logits"
    return proto.SerializeToString()


def _onnx_runner(data: bytes) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime: pip install 'cnnlab[export]'") from None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def _exported_program(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """A torch.export ExportedProgram with a dynamic batch size, saved as a ``.pt2`` archive."""
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _exported_program_runner(data: bytes) -> Runner:
    return torch.export.load(io.BytesIO(data)).module()


class _TorchScriptDeprecation(warnings.catch_warnings):
    """Around our calls of torch.jit: its FutureWarning says TorchScript is deprecated, which we know (``.pt2``
    is offered beside it), and would be a line of noise on every export; tracing warnings are answered by the
    check of every export against PyTorch."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)


def _torchscript(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    with torch.no_grad(), _TorchScriptDeprecation():
        traced = torch.jit.trace(model, example, check_trace=False)  # export() checks the saved file instead
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _jit_load(source: Path | io.BytesIO, extra_files: dict[str, Any] | None = None):
    with _TorchScriptDeprecation():
        return torch.jit.load(source if isinstance(source, io.BytesIO) else str(source), _extra_files=extra_files)


# format → (model, example input, metadata → the file's bytes; bytes → a function running the file)
EXPORTERS: dict[str, tuple[Callable[[nn.Module, torch.Tensor, dict[str, Any]], bytes], Callable[[bytes], Runner]]] = {
    "onnx": (_onnx, _onnx_runner),
    "pt2": (_exported_program, _exported_program_runner),
    "torchscript": (_torchscript, lambda data: _jit_load(io.BytesIO(data))),
}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a file written by ``export``, whichever its format."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # .pt2 and TorchScript files are zip archives; ONNX files are protobuf
        files = {METADATA_FILE: ""}
        with zipfile.ZipFile(path) as archive:
            is_pt2 = any(name.endswith("/archive_format") for name in archive.namelist())
        if is_pt2:
            torch.export.load(path, extra_files=files)
        else:
            _jit_load(path, files)
        return json.loads(files[METADATA_FILE])
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}
