"""Exporting a trained model to ONNX or TorchScript for use outside cnnlab.

The exported model takes what a user has after decoding an image: **float32 pixels in [0, 1]**,
shape (N, C, image_size, image_size), RGB (or one gray channel), any batch size. Normalisation by the
run's mean and std is part of the graph; the output is the (N, num_classes) **logits** (apply softmax
for probabilities). Resize the image to image_size first — cnnlab itself uses a bilinear resize
(``align_corners=False``), see ``cnnlab.predict``.

The file also carries what is needed to use it, as JSON strings under these keys: ``classes``,
``image_size``, ``in_channels``, ``mean``, ``std``, ``input``, ``output``, ``model``, ``cnnlab_version``.
In ONNX they are the model's ``metadata_props`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``);
in TorchScript they are one extra file, ``metadata.json``
(``torch.jit.load(path, _extra_files={"metadata.json": ""})``).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import cnnlab
from cnnlab import run
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write

FORMATS = ("onnx", "torchscript")
INPUT = "image"
OUTPUT = "logits"
METADATA_FILE = "metadata.json"  # the TorchScript extra file
INPUT_CONVENTION = ("float32 (N, C, image_size, image_size), RGB (or gray) pixels in [0, 1]; "
                    "normalisation by mean/std is inside the model")


def export(path: str | Path, format: str, out: str | Path) -> dict[str, Any]:  # noqa: A002 - the CLI's name
    """Write the model of a run folder or checkpoint to ``out`` as ONNX or TorchScript.

    The export is checked before it is kept: the exported file is run on a random batch and must agree
    with PyTorch within 1e-4. Returns ``{"out", "format", "metadata", "max_abs_diff"}``.
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose onnx or torchscript")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the file to write, e.g. {out / ('model.' + _suffix(format))}")
    loaded = run.load(path, device="cpu")
    pre = loaded.preprocess
    channels, size = pre.channels, pre.size
    wrapped = nn.Sequential(pre.normalizer(), loaded.model).eval()
    metadata = {
        "classes": loaded.classes, "image_size": size, "in_channels": channels,
        "mean": list(pre.mean), "std": list(pre.std),
        "input": INPUT_CONVENTION, "output": f"float32 (N, {len(loaded.classes)}) logits, in the order of classes",
        "model": loaded.spec.name, "cnnlab_version": cnnlab.__version__,
        # The file holds one view; a run scored with flip TTA averaged the logits of x and x.flip(-1).
        "flip_tta": loaded.tta,
    }
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    # Exported to bytes and checked from those bytes before anything is written.
    if format == "onnx":
        data = _onnx(wrapped, example, metadata)
        run_exported = _onnx_runner(data)
    else:
        data = _torchscript(wrapped, example, metadata)
        run_exported = _jit_load(io.BytesIO(data))
    check = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (run_exported(check) - wrapped(check)).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(f"the exported {format} model differs from PyTorch by {diff:.3g} (over 1e-4)")
    try:
        atomic_write(out, data)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
    return {"out": str(out), "format": format, "metadata": metadata, "max_abs_diff": diff}


def _suffix(format: str) -> str:  # noqa: A002
    return "onnx" if format == "onnx" else "pt"


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


def _onnx_runner(data: bytes):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime: pip install 'cnnlab[export]'") from None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def _torchscript(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(model, example, check_trace=False)  # export() checks the saved file instead
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _jit_load(source: Path | io.BytesIO, extra_files: dict[str, Any] | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        return torch.jit.load(source if isinstance(source, io.BytesIO) else str(source), _extra_files=extra_files)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a file written by ``export``, whichever its format."""
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # TorchScript files are zip archives; ONNX files are protobuf
    if is_zip:
        files = {METADATA_FILE: ""}
        _jit_load(path, files)
        return json.loads(files[METADATA_FILE])
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}
