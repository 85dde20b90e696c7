"""Memory bombs (#25): small files that asked for gigabytes, and the warnings normal use printed on stderr.

Each bomb is built here, small on disk, and opened in a child process whose peak resident memory is
measured around the one call that reads it (the peak is reset just before it, /proc/self/clear_refs),
so that the bound holds for what the call itself spends. README ("Untrusted files") states the bounds.
"""

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.core import images
from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess
from cnnlab.train.logging import RunLog

MiB = 2**20
# What one call may add to a process at most; README quotes these bounds.
REFUSED_BOUND = 32 * MiB  # a bomb refused from its headers
DECODED_BOUND = 96 * MiB  # the 16-bit image below, decoded: 32 MiB as PIL holds it, 16 MiB at 8 bits

CHILD = textwrap.dedent("""
    import json, sys
    {setup}
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident memory, to the current
    before = status("VmRSS")
    try:
        {call}
        outcome = "ok"
    except Exception as e:
        outcome = f"{{type(e).__name__}}: {{e}}"
    print(json.dumps({{"grew": status("VmHWM") - before, "outcome": outcome}}))
""")


def measured(setup: str, call: str) -> tuple[int, str]:
    """Bytes the peak resident memory of a fresh process grew by during ``call``, and how ``call`` ended."""
    code = CHILD.format(setup=setup, call=call)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["grew"], result["outcome"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, bit_depth: int) -> bytes:
    """A grayscale PNG whose header promises ``width`` × ``height`` pixels and whose data holds one row."""
    row = b"\0" * (1 + width * bit_depth // 8)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(row)) + png_chunk(b"IEND", b""))


# --- 1. images: the budget from the header, reduced decoding, no float64 copy ---------------------------


def test_an_image_over_the_budget_is_refused_from_its_header_naming_its_size_and_the_limit(tmp_path):
    path = tmp_path / "huge16.png"
    path.write_bytes(png_header_only(13_000, 13_000, 16))  # the 16-bit 13,000 px square
    grew, outcome = measured("from cnnlab.core import images",
                             f"images.decode({str(path)!r}, 1, fit=(32, 32))")
    assert outcome.startswith("TooLarge: it is 13,000×13,000 pixels (I;16), 322 MiB decoded, more than the "
                              "256 MiB one image may take"), outcome
    assert grew < REFUSED_BOUND, grew


def test_uploads_have_a_lower_budget_than_training_files():
    data = png_header_only(9_000, 9_000, 8)  # 77 MiB as 8-bit gray: within the training budget, not an upload's
    with pytest.raises(images.TooLarge, match=r"9,000×9,000 pixels \(L\), 77 MiB decoded, more than the 64 MiB"):
        Preprocess(32, 1).read(data, max_bytes=images.UPLOAD_DECODED_BYTES)
    assert Preprocess(32, 1).read(data).shape == (1, 256, 256)  # the rows the data lacks are black


def test_a_16_bit_image_is_brought_to_8_bits_without_a_float64_copy(tmp_path):
    side = 4096  # 32 MiB as PIL holds it; the float64 copies of it took 128 MiB each
    ramp = (np.arange(side * side, dtype=np.uint64) * 7919 % 65536).astype(np.uint16).reshape(side, side)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    grew, outcome = measured("from cnnlab.core import images", f"images.decode({str(path)!r}, 1)")
    assert outcome == "ok" and grew < DECODED_BOUND, (grew, outcome)


def test_a_large_jpeg_is_decoded_reduced_for_predict(tmp_path):
    x = np.arange(6000, dtype=np.uint8)[None, :, None]  # a 6000 × 4000 photo: 92 MiB decoded, 1.4 MiB at an eighth
    rgb = np.broadcast_to(x, (4000, 6000, 3)) + np.arange(4000, dtype=np.uint8)[:, None, None]
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    grew, outcome = measured("from cnnlab.core.spec import Preprocess",
                             f"assert Preprocess(224, 3).read({str(path)!r}).shape == (3, 256, 256)")
    assert outcome == "ok" and grew < REFUSED_BOUND, (grew, outcome)


@pytest.mark.parametrize("mode, values", [
    ("I;16", np.arange(65536, dtype=np.uint16)),
    ("I", np.arange(-1000, 70000, 7, dtype=np.int32)),  # above 255: the 16-bit range
    ("I", np.arange(-5, 256, dtype=np.int32)),  # 8-bit values in 32 bits: clipped only
    ("F", np.linspace(-0.1, 1.0, 70001, dtype=np.float32)),  # [0, 1] floats
    ("F", np.linspace(-50, 400, 70001, dtype=np.float32)),
])
def test_wide_images_reach_8_bits_as_before(mode, values):
    img = Image.fromarray(values.reshape(1, -1))
    assert img.mode == mode
    wide = values.astype(np.float64)  # the conversion as it was, in float64
    if mode == "I;16" or (mode == "I" and wide.max() > 255):
        wide = wide / 257.0
    elif mode == "F" and wide.max() <= 1.0:
        wide = wide * 255.0
    before = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
    after = np.asarray(images.to_gray(img))[0]
    assert after.dtype == np.uint8 and np.abs(after.astype(int) - before).max() <= (1 if mode == "F" else 0)


def test_reduced_decoding_leaves_normal_images_untouched_and_large_ones_close(tmp_path):
    y, x = np.mgrid[0:1200, 0:1500]
    smooth = np.stack([x * 255 // 1500, y * 255 // 1200, (x + y) * 255 // 2700], -1).astype(np.uint8)
    img = Image.fromarray(smooth)
    data = io.BytesIO()
    img.save(data, "PNG")
    reduced = images.decode(data.getvalue(), 3, fit=(32, 32))  # 1200 // 96: a box reduction by 12 first
    full = torch.nn.functional.interpolate(torch.from_numpy(smooth[:, 150:1350].transpose(2, 0, 1).copy())[None],
                                           size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
    assert np.abs(reduced.astype(int) - full.numpy().astype(int)).max() <= 2
    small = images.decode(data.getvalue(), 3, fit=(500, 400))  # less than 3 × 2 times smaller: not reduced
    crop = smooth[:, 0:1500]
    expect = torch.nn.functional.interpolate(torch.from_numpy(crop.transpose(2, 0, 1).copy())[None], size=(400, 500),
                                             mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    assert np.array_equal(small, expect)


# --- 5. a zip bomb below the per-member check -----------------------------------------------------------


def test_a_zip_of_many_small_bombs_is_refused_before_a_member_is_inflated(tmp_path):
    path = tmp_path / "bomb.zip"
    member = b"\0" * (2 * MiB - 1)  # under the per-member ratio floor, like the 16 MiB - 1
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(60):
            zf.writestr(f"train/{'ab'[i % 2]}/{i}.png", member)
    assert path.stat().st_size < 300 * 2**10  # 120 MiB unpacked
    grew, outcome = measured("from pathlib import Path\nfrom cnnlab.data import archives",
                             f"archives.read_archive(Path({str(path)!r}), Path({str(tmp_path)!r}))")
    assert outcome.startswith(f"UserError: archive {path} unpacks to more than 200 times its size on disk"), outcome
    assert grew < REFUSED_BOUND, grew


# --- 5b. an archive's members are unpacked to disk, not held in memory ------------------------------------

NOISE_MEMBERS, NOISE_SIDE = 24, 836  # 24 PNGs of 836 × 836 RGB noise, stored: 2.0 MiB each, 48 MiB in all
UNPACKED_SHARE = 4  # reading the layout may add at most a quarter of the unpacked bytes to the peak memory

READ_LAYOUT = textwrap.dedent("""
    import os, stat
    from contextlib import ExitStack
    from pathlib import Path
    from PIL import Image
    from cnnlab.data.readers.archive import ArchiveReader
    from cnnlab.data.store import entries_dir
    Image.init()  # the plugins the header check imports: code, not the archive's memory
    def read(path, sizes):
        with ExitStack() as scratch:
            layout = ArchiveReader(Path(path)).layout(scratch)
            files = {rel: data for split in layout.items.values() for rel, data, _ in split}
            folder = next(iter(files.values())).path.parent
            assert folder.parent == entries_dir() and stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
            assert {rel: member.size for rel, member in files.items()} == sizes
            assert (folder / "members").stat().st_size == sum(sizes.values())
        assert not folder.exists(), folder
""")


def noise_members() -> dict[str, bytes]:
    """PNGs of random noise (incompressible, as photos nearly are), in train/ and test/ class folders."""
    rng = np.random.default_rng(0)
    members = {}
    for i in range(NOISE_MEMBERS):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (NOISE_SIDE, NOISE_SIDE, 3), dtype=np.uint8)).save(
            out, "PNG", compress_level=0)
        members[f"{'train' if i % 4 else 'test'}/{'ab'[i % 2]}/{i}.png"] = out.getvalue()
    return members


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def noise() -> dict[str, bytes]:
    return noise_members()


@pytest.mark.parametrize("name", ["noise.zip", "noise.tar.gz"])
def test_reading_an_archive_holds_a_few_members_in_memory_not_the_archive(tmp_path, noise, name):
    members = noise
    unpacked = sum(map(len, members.values()))
    assert unpacked > 46 * MiB
    path = write_archive(tmp_path / name, members)
    sizes = {rel: len(data) for rel, data in members.items()}
    grew, outcome = measured(f"{READ_LAYOUT}\nos.environ['CNNLAB_CACHE'] = {str(tmp_path / 'cache')!r}",
                             f"read({str(path)!r}, {sizes!r})")
    assert outcome == "ok", outcome
    assert grew < unpacked / UNPACKED_SHARE, (grew, unpacked)
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir()] == []


def test_a_full_disk_while_unpacking_is_one_line_naming_the_folder_which_is_removed(tmp_path):
    members = {"train/a/0.png": bytes(3 * MiB), "test/a/0.png": b"x"}
    path = write_archive(tmp_path / "big.zip", members)
    # A file size limit makes the write fail as a full disk does (EFBIG instead of ENOSPC), in this process only.
    limit = "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n" \
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({2 * MiB}, resource.RLIM_INFINITY))"
    _, outcome = measured(f"{READ_LAYOUT}\nos.environ['CNNLAB_CACHE'] = {str(tmp_path / 'cache')!r}\n{limit}",
                          f"read({str(path)!r}, {{}})")
    root = tmp_path / "cache" / "datasets"
    assert outcome.startswith(f"UserError: cannot unpack archive {path} into {root}/.unpacked-"), outcome
    assert outcome.endswith(": File too large; free some space on that disk or set CNNLAB_CACHE to a folder on "
                            "another one"), outcome
    assert list(root.iterdir()) == []


def small_archive(path: Path) -> Path:
    """Two classes of two 64 × 64 images per split; ``test/b/1.jpg`` is cut short (its header reads, its pixels not)."""
    members = {}
    for split in ("train", "test"):
        for cls in "ab":
            for i in range(2):
                out = io.BytesIO()
                Image.new("RGB", (64, 64), (i * 40, 100, 200)).save(out, "PNG")
                members[f"{split}/{cls}/{i}.png"] = out.getvalue()
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, "JPEG")
    del members["test/b/1.png"]
    members["test/b/1.jpg"] = out.getvalue()[:len(out.getvalue()) * 3 // 4]
    return write_archive(path, members)


@pytest.mark.parametrize("ending", ["built", "bad image", "ctrl-c"])
def test_the_scratch_folder_lasts_until_the_images_are_decoded_and_then_goes(tmp_path, monkeypatch, ending):
    from cnnlab.data.dataset import load_dataset
    from cnnlab.data.readers import decoding
    from cnnlab.data.store import entries_dir

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    path = small_archive(tmp_path / "small.zip")
    seen, real = [], images.decode

    def decode(source, *args, **kwargs):
        spools = entries_dir().glob(".unpacked-*/members")
        seen.extend((spool, oct(spool.parent.stat().st_mode & 0o777)) for spool in spools)
        if ending == "ctrl-c":
            raise KeyboardInterrupt
        return real(source, *args, **kwargs)

    monkeypatch.setattr(decoding.images, "decode", decode)
    if ending == "built":
        data = load_dataset(f"folder:{path}", skip_bad_images=True)
        assert data.skipped == ["test/b/1.jpg"] and data.test_x.shape == (3, 3, 64, 64)
        assert data.train_x[:, 0, 0, 0].tolist() == [0, 40, 0, 40]
    else:
        with pytest.raises(UserError if ending == "bad image" else KeyboardInterrupt) as raised:
            load_dataset(f"folder:{path}")
        if ending == "bad image":
            assert str(raised.value).startswith(f"{path}: cannot decode image test/b/1.jpg (cannot decode the image")
    assert seen and {(spool.name, mode) for spool, mode in seen} == {("members", "0o700")}, seen
    assert not seen[0][0].parent.exists()
    assert not list(entries_dir().glob(".unpacked-*"))


def test_a_member_that_is_no_image_is_named_by_its_place_in_the_archive_not_on_disk(tmp_path, monkeypatch):
    from cnnlab.data.dataset import load_dataset

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    path = small_archive(tmp_path / "notes.zip")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("test/a/notes.png", b"not an image")
    with pytest.raises(UserError) as raised:
        load_dataset(f"folder:{path}")
    assert str(raised.value) == (f"{path}: cannot read image test/a/notes.png (not an image PIL can read); remove or "
                                 "replace the file, or pass `skip_bad_images` to leave such files out")


def test_a_scratch_folder_left_by_a_killed_process_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    from cnnlab.data.scratch import scratch_folder
    from cnnlab.data.store import entries_dir

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    dead = entries_dir() / ".unpacked-dead"
    dead.mkdir(parents=True)
    (dead / ".lock").touch()  # nobody holds it: its process is gone
    (dead / "0000000.png").write_bytes(b"x" * 1000)
    with scratch_folder() as live:
        assert not dead.exists() and live.is_dir()
        with scratch_folder() as other:
            assert live.is_dir() and other != live
        assert live.is_dir() and not other.exists()
    assert list(entries_dir().iterdir()) == []


# --- 6. tar long-name and pax headers ---------------------------------------------------------------------


def tar_with_extended_header(path: Path, kind: bytes, size: int) -> None:
    """A .tar.gz with a GNU long name ('L') or pax ('x') header of ``size`` bytes before a real image member."""
    name = b"train/a/0.png"
    if kind == tarfile.GNUTYPE_LONGNAME:
        payload = name + b"\0" * (size - len(name))
    else:
        value = b"a" * (size - 100)
        record = b" path=" + value + b"\n"
        digits = len(str(len(record) + 10))
        payload = str(len(record) + digits).encode() + record
        payload += b"\0" * (size - len(payload))
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, len(payload)
    image = io.BytesIO()
    Image.new("RGB", (4, 4)).save(image, "PNG")
    member = tarfile.TarInfo("x.png")
    member.size = len(image.getvalue())
    with tarfile.open(path, "w:gz") as tar:
        tar.fileobj.write(header.tobuf(tarfile.GNU_FORMAT))
        tar.fileobj.write(payload + b"\0" * (-len(payload) % 512))
        tar.offset += 512 + len(payload) + (-len(payload) % 512)
        tar.addfile(member, io.BytesIO(image.getvalue()))


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_a_tar_extended_header_beyond_any_real_one_is_refused_before_it_is_read(tmp_path, kind):
    path = tmp_path / "long.tar.gz"
    tar_with_extended_header(path, kind, 64 * MiB)
    assert path.stat().st_size < 2 * MiB
    grew, outcome = measured("from pathlib import Path\nfrom cnnlab.data import archives",
                             f"archives.read_archive(Path({str(path)!r}), Path({str(tmp_path)!r}))")
    assert outcome.startswith(f"UserError: archive {path} has an extended header (a long name or pax record, "
                              f"type {kind.decode()!r}) of 64.0 MiB"), outcome
    assert grew < REFUSED_BOUND, grew


def test_a_long_name_of_a_real_size_still_reads(tmp_path):
    path = tmp_path / "long.tar.gz"
    tar_with_extended_header(path, tarfile.GNUTYPE_LONGNAME, 4096)
    from cnnlab.data import archives

    (tmp_path / "unpacked").mkdir()
    assert list(archives.read_archive(path, tmp_path / "unpacked").files) == ["train/a/0.png"]


# --- 7. the CIFAR unpickler -------------------------------------------------------------------------------


class Call:
    """Pickles as a call of ``fn(*args)``, as a tampered file would spell it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("bomb, refused", [
    (Call(bytearray, 256 * MiB), "bytearray"),
    (Call(bytes, 256 * MiB), "could not|not callable|argument|takes 0"),
    (Call(bytearray, 10**13), "bytearray"),
    (Call(np.ndarray, (32 * MiB,), "O"), "ndarray|not callable"),
])
def test_a_cifar_file_cannot_ask_for_memory(tmp_path, bomb, refused):
    path = tmp_path / "batches.meta"
    path.write_bytes(pickle.dumps({b"label_names": bomb}, protocol=4))  # names builtins.bytearray, not __builtin__
    assert path.stat().st_size < 200
    grew, outcome = measured("from pathlib import Path\nfrom cnnlab.data import standard",
                             f"standard._read_cifar_pickle(Path({str(path)!r}))")
    assert outcome.startswith(f"UserError: {path} is not a valid CIFAR-10 file"), outcome
    assert "\n" not in outcome and grew < REFUSED_BOUND, (grew, outcome)
    import re

    assert re.search(refused, outcome), outcome


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_arrays_read_back_exactly_and_writable(tmp_path, protocol):
    from cnnlab.data import standard

    data = np.random.default_rng(protocol).integers(0, 256, (5, 3072), dtype=np.uint8)
    big_endian = np.arange(5, dtype=">i4")
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2, 3, 4, 5], b"order": big_endian,
                                   b"batch_label": b"", b"name": b"training batch 1 of 5"}, protocol=protocol))
    read = standard._read_cifar_pickle(path)
    assert np.array_equal(read["data"], data) and read["data"].dtype == np.uint8 and read["data"].flags.writeable
    assert np.array_equal(read["order"], big_endian) and read["labels"] == [1, 2, 3, 4, 5]
    assert read["batch_label"] == b"" and read["name"] == b"training batch 1 of 5"


def test_a_cifar_array_whose_shape_does_not_match_its_bytes_is_refused(tmp_path):
    from cnnlab.core.errors import UserError
    from cnnlab.data import standard

    raw = pickle.dumps({b"data": np.zeros((2, 4), np.uint8)}, protocol=2)
    path = tmp_path / "batch"
    path.write_bytes(raw.replace(b"K\x02K\x04\x86", b"J\x00\x00\x00\x10K\x04\x86"))  # shape (2**28, 4)
    with pytest.raises(UserError, match="whose 8 bytes do not match it"):
        standard._read_cifar_pickle(path)


# --- the warnings normal use printed ---------------------------------------------------------------------


def test_a_gray_image_read_for_predict_warns_about_nothing(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable" among them
        pixels = Preprocess(32, 1).read(path)
    assert pixels.shape == (1, 64, 64) and int(pixels[0, 0, 1]) == 1


def test_an_image_above_pils_warning_threshold_gives_no_pil_warning(recwarn):
    data = png_header_only(10_000, 9_000, 8)  # 90 Mpx: PIL warns from 89.5 Mpx on
    assert images.decode(data, 1, fit=(32, 32)).shape == (1, 32, 32)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_control_characters_in_class_names_reach_the_prediction_figure_escaped(tmp_path, recwarn):
    log = RunLog(tmp_path, total_steps=1)
    try:
        images_ = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
        log.predictions(images_, torch.tensor([0, 1]), torch.tensor([1, 1]), ["a\x1b[31mred", "b\nforged"], 1)
    finally:
        log.close()
    assert not [w for w in recwarn if "Glyph" in str(w.message)], [str(w.message) for w in recwarn]
