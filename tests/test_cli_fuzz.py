"""Property: whatever a user types or writes in a TOML file, cnnlab ends with exit 0, or exit 2 and one line.

Training itself is replaced by its set-up (device, data, model: everything that reads the
configuration) so that thousands of inputs run in seconds; the real loop is covered elsewhere.
"""

import contextlib
import io
import json
import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab import cli
from cnnlab.config import FIELDS
from cnnlab.train import engine
from cnnlab.train.engine import Result

# Fixed examples by default, so that a run is repeatable; CNNLAB_FUZZ_EXAMPLES=5000 explores afresh.
EXPLORE = int(os.environ.get("CNNLAB_FUZZ_EXAMPLES", 0))


def fuzz(examples):
    return settings(max_examples=EXPLORE or examples, derandomize=not EXPLORE, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


FLAGS = ["--" + name.replace("_", "-") for name in FIELDS if name not in ("recipe", "mean", "std", "download")]
WORDS = ["resnet18", "resnet18-seed", "resnet18-cifar", "sample", "cifar10", "folder:", "folder:/nonexistent",
         "cpu", "auto", "cuda", "cosine", "onecycle", "constant", "none", "flip-crop", "seed", "paper", "fast"]

numbers = st.one_of(
    st.integers(-3, 40).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e6", "-0", "0.0", "nan", "inf", "1_000", "0x10", "", " ", "١٢"]),
)
values = st.one_of(numbers, st.sampled_from(WORDS), st.text(max_size=12))


def run(argv, fake_train=True):
    """cli.main with stdout/stderr captured: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own exits
            code = e.code
    return code, err.getvalue()


def check(code, err):
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("cnnlab"), err


@contextlib.contextmanager
def setup_only():
    """engine.train runs its whole set-up, then returns before the first step."""
    original = engine._start

    def start(setup, *rest):
        return Result(setup.run_dir, {"epoch": 0, "step": 0}, None)

    engine._start = start
    try:
        yield
    finally:
        engine._start = original


SMALL = ["--dataset", "sample", "--model", "resnet18-cifar", "--width", "2", "--limit-train", "64",
         "--limit-test", "16", "--device", "cpu"]


@fuzz(150)
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), values), max_size=4),
       recipe=st.sampled_from([[], ["--recipe", "fast"], ["--recipe", "seed"], ["--recipe", "bogus"]]))
def test_train_flags_end_in_0_or_2(tmp_path_factory, pairs, recipe):
    out = tmp_path_factory.mktemp("fuzz")
    argv = ["train", *recipe, *SMALL]
    for flag, value in pairs:
        if flag != "--out":
            argv += [f"{flag}={value}"]
    with setup_only():
        check(*run(argv + ["--out", str(out / "run")]))


toml_scalars = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=8),
                         st.sampled_from(WORDS))
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))


def toml_literal(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(value)  # ints and strings: JSON spelling is TOML spelling


@fuzz(150)
@given(table=st.dictionaries(st.one_of(st.sampled_from(sorted(FIELDS)),
                                       st.from_regex(r"[a-z_\-]{1,10}", fullmatch=True)),
                             toml_values, max_size=5),
       junk=st.one_of(st.none(), st.text(max_size=30)))
def test_toml_configs_end_in_0_or_2(tmp_path_factory, table, junk):
    folder = tmp_path_factory.mktemp("toml")
    path = folder / "c.toml"
    text = "".join(f"{k} = {toml_literal(v)}\n" for k, v in table.items() if k not in ("out", "download", "data_dir"))
    path.write_text(text if junk is None else text + junk, encoding="utf-8")
    with setup_only():
        check(*run(["train", "--config", str(path), *SMALL, "--out", str(folder / "run")]))


@fuzz(60)
@given(argv=st.one_of(
    st.tuples(st.just("summary"), st.sampled_from(["resnet18-cifar", "resnet18", "vgg16", ""]),
              st.sampled_from(["--width", "--image-size", "--num-classes"]), numbers).map(
        lambda t: [t[0], t[1], "--width=2", f"{t[2]}={t[3]}"]),
    st.tuples(st.sampled_from(["evaluate", "train --resume", "visualize features", "predict"]),
              st.text(max_size=20)).map(
        lambda t: [*t[0].split(), t[1] or "x"]),
    st.lists(st.text(max_size=10), max_size=3),
))
def test_any_other_command_line_ends_in_0_or_2(argv):
    code, err = run(argv)
    check(code, err)
