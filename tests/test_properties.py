"""Property-based tests: bad configs, data and fitter inputs are refused in one line naming
the field, with nothing written; good ones are accepted."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch import config as config_lib
from launch import preflight
from launch.cli import main
from scaling.errors import UserError
from scaling.fitting.fit import fit

FAST = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SLOWER = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

POSITIVE_INTS = [
    "model.n_layer",
    "model.d_model",
    "model.n_heads",
    "model.n_ctx",
    "model.vocab_size",
    "train.steps",
    "train.batch_size",
    "train.nan_check_every",
    "eval.batches",
    "eval.points",
    "checkpoint.every",
    "checkpoint.max_to_keep",
]
INT_KEYS = POSITIVE_INTS + ["seed", "model.d_ff", "train.warmup_steps"]
FLOAT_KEYS = ["train.learning_rate", "train.weight_decay", "data.val_fraction"]
BOOL_KEYS = ["progress"]


def _refused(argv_tail, key_named, data_cache, study="experiments/local_cpu.py:tiny"):
    """Run the CLI in a fresh folder; assert one `error:` line naming `key_named`, exit 2 and
    neither store nor workdir written."""
    import contextlib
    import io

    with tempfile.TemporaryDirectory() as tmp:
        store, workdir = Path(tmp, "s.sqlite"), Path(tmp, "runs")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(
                [
                    "run",
                    study,
                    f"--config.store={store}",
                    f"--config.workdir={workdir}",
                    f"--config.data.cache_dir={data_cache}",
                    "--config.progress=false",
                    *argv_tail,
                ]
            )
        message = err.getvalue().strip()
        assert code == 2, message
        assert message.startswith("error: ") and "\n" not in message, message
        assert key_named in message, message
        assert not store.exists() and not workdir.exists()
    return message


@FAST
@given(key=st.sampled_from(POSITIVE_INTS), value=st.integers(-(10**6), 0))
def test_zero_or_negative_sizes_are_refused(key, value, data_cache):
    message = _refused([f"--config.{key}={value}"], f"{key}={value}", data_cache)
    assert "positive" in message or "must be" in message


@FAST
@given(
    key=st.sampled_from(INT_KEYS + FLOAT_KEYS + BOOL_KEYS),
    value=st.text(
        st.characters(codec="ascii", exclude_characters="\n\r\x00"), min_size=1, max_size=8
    ),
)
def test_overrides_of_the_wrong_type_are_refused(key, value, data_cache):
    kind = "int" if key in INT_KEYS else "float" if key in FLOAT_KEYS else "bool"
    try:
        if kind == "bool":
            assert value.lower() not in ("true", "false", "1", "0", "yes", "no")
        else:
            number = float(value)
            if kind == "int":
                assert not number.is_integer()
            else:
                return  # a valid float: not this test's case
    except (ValueError, OverflowError):
        pass
    except AssertionError:
        return  # a value of the right type
    _refused([f"--config.{key}={value}"], f"config.{key}=", data_cache)


@FAST
@given(
    n_layer=st.integers(1, 6),
    n_heads=st.integers(1, 8),
    head=st.integers(1, 32),
    n_ctx=st.integers(1, 1024),
    steps=st.integers(1, 10_000),
    batch=st.integers(1, 256),
    warmup_share=st.floats(0, 0.99),
    lr=st.floats(1e-6, 1.0),
)
def test_valid_configs_are_accepted(n_layer, n_heads, head, n_ctx, steps, batch, warmup_share, lr):
    config = config_lib.base_config()
    config_lib.apply_overrides(
        config,
        {
            "model.n_layer": str(n_layer),
            "model.n_heads": str(n_heads),
            "model.d_model": str(n_heads * head),
            "model.n_ctx": str(n_ctx),
            "train.steps": str(steps),
            "train.batch_size": str(batch),
            "train.warmup_steps": str(int(warmup_share * steps)),
            "train.learning_rate": repr(lr),
        },
    )
    config_lib.validate(config)
    shape = config_lib.model_config(config).shape
    assert shape.d_model == n_heads * head and shape.n_params > 0
    assert len(config_lib.run_id(config)) == 12


@FAST
@given(members=st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=5))
def test_sweep_members_that_collide_are_refused(members):
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp, "study.py")
        sweep = [{"seed": s} for s in members]
        study.write_text(
            "from launch.config import base_config\n"
            "def get_config(arg=None):\n    return base_config()\n"
            f"def get_sweep(arg=None):\n    return {sweep!r}\n"
        )
        if len(set(members)) < len(members):
            try:
                config_lib.study_sweep(str(study))
            except UserError as e:
                assert "collide on run id" in str(e) and "\n" not in str(e)
            else:
                raise AssertionError(f"colliding members {members} were accepted")
        else:
            assert len(config_lib.study_sweep(str(study))) == len(members)


def _text_args(folder: Path, docs: list[bytes], extra=()):
    for i, raw in enumerate(docs):
        Path(folder, f"doc{i}.txt").write_bytes(raw)
    return ["--config.data.corpus=text", f"--config.data.paths={folder}/*.txt", *extra]


GOOD_DOC = (
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=60)
    .filter(lambda t: t.strip())
    .map(lambda t: t.encode("utf-8"))
)
BAD_DOC = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: not _decodes(b)),
    st.sampled_from([b"", b"  \n\t "]),
)


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@SLOWER
@given(good=st.lists(GOOD_DOC, min_size=1, max_size=3), bad=BAD_DOC, where=st.integers(0, 3))
def test_non_utf8_or_empty_text_files_are_refused(good, bad, where, data_cache):
    with tempfile.TemporaryDirectory() as texts:
        docs = good[:where] + [bad] + good[where:]
        bad_name = f"doc{min(where, len(good))}.txt"
        message = _refused(_text_args(Path(texts), docs), bad_name, data_cache)
        assert "UTF-8" in message or "empty" in message


@SLOWER
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=5), n_ctx_extra=st.integers(0, 200))
def test_a_sequence_longer_than_any_document_is_refused(sizes, n_ctx_extra, data_cache):
    with tempfile.TemporaryDirectory() as texts:
        docs = [b"a" * n for n in sizes]
        n_ctx = sum(sizes) + len(sizes) + n_ctx_extra  # longer than all the text together
        message = _refused(
            _text_args(Path(texts), docs, [f"--config.model.n_ctx={n_ctx}"]), "n_ctx", data_cache
        )
        assert "shorter" in message


@SLOWER
@given(batches=st.integers(1, 50), batch=st.integers(1, 64))
def test_an_eval_set_larger_than_the_held_out_text_is_refused(batches, batch, data_cache):
    with tempfile.TemporaryDirectory() as texts:
        # Ten documents of 300 bytes: one (301 tokens) is held out for validation.
        docs = [bytes([97 + i]) * 300 for i in range(10)]
        args = [
            f"--config.eval.batches={batches}",
            f"--config.train.batch_size={batch}",
            "--config.model.n_ctx=16",
        ]
        if batches * batch * 17 <= 301:  # fits: accepted by the checks (nothing is trained)
            config = config_lib.study_config(
                "experiments/local_cpu.py:tiny",
                {
                    "data.corpus": "text",
                    "data.paths": f"{texts}/*.txt",
                    "data.cache_dir": data_cache,
                    "eval.batches": str(batches),
                    "train.batch_size": str(batch),
                    "model.n_ctx": "16",
                    "progress": "false",
                    "workdir": f"{texts}/runs",
                },
            )
            for i, raw in enumerate(docs):
                Path(texts, f"doc{i}.txt").write_bytes(raw)
            assert len(preflight.check_run(config).val) == 301
        else:
            message = _refused(_text_args(Path(texts), docs, args), "eval.batches", data_cache)
            assert "fewer" in message


# -- fitter inputs -------------------------------------------------------------------------

X = np.geomspace(1.0, 1e4, 12)


@SLOWER
@given(
    E=st.floats(0.1, 5),
    A=st.floats(0.1, 50),
    alpha=st.floats(0.05, 2),
    noise=st.lists(st.floats(-0.02, 0.02), min_size=12, max_size=12),
)
def test_valid_fitter_inputs_give_finite_params(E, A, alpha, noise):
    y = (E + A * X**-alpha) * np.exp(noise)
    result = fit("saturating", X, y)
    for name, value in result.params.items():
        assert np.all(np.isfinite(value)), (name, value)
    assert result.n_points.tolist() == [12]


@FAST
@given(
    position=st.integers(0, 11),
    bad=st.sampled_from([0.0, -1.0, np.nan, np.inf, -np.inf]),
    which=st.sampled_from(["x", "y"]),
)
def test_invalid_fitter_values_name_the_point(position, bad, which):
    x, y = X.copy(), 2.0 + X**-0.5
    (x if which == "x" else y)[position] = bad
    try:
        fit("saturating", x, y)
    except UserError as e:
        message = str(e)
        assert "\n" not in message and f"point {position}: {which}" in message
        assert "positive finite" in message
    else:
        raise AssertionError(f"{which}[{position}] = {bad} was accepted")


@FAST
@given(n_valid=st.integers(0, 2), shape_error=st.booleans())
def test_too_few_points_or_a_bad_mask_are_refused(n_valid, shape_error):
    mask = np.zeros(12, bool)
    mask[:n_valid] = True
    try:
        fit("saturating", X, 2.0 + X**-0.5, mask[:-1] if shape_error else mask)
    except UserError as e:
        assert "\n" not in str(e)
        assert ("mask must be" in str(e)) if shape_error else ("valid points" in str(e))
    else:
        raise AssertionError("accepted")
