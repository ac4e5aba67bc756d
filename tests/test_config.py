from pathlib import Path

import pytest

from launch import config as config_lib
from scaling.errors import UserError

STUDIES = sorted(
    str(p)
    for p in (Path(__file__).parents[1] / "experiments").glob("*.py")
    if p.name != "__init__.py"
)


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_loads_and_validates(study):
    config = config_lib.study_config(study)
    members = config_lib.study_sweep(study)
    assert members, f"{study} has an empty sweep"
    assert len({config_lib.run_id(m) for m in members}) == len(members)
    assert config.sweep_name


def test_local_study_spans_thirty_times_in_n_at_one_token_budget():
    from launch.train import run_record

    members = config_lib.study_sweep("experiments/local_cpu.py")
    records = [run_record(m, config_lib.run_id(m)) for m in members]
    sizes = [r.n_params for r in records]
    assert len(members) >= 5 and max(sizes) / min(sizes) >= 30
    assert len({r.tokens for r in records}) == 1


def test_overrides_are_typed_by_the_key_they_replace():
    config = config_lib.base_config()
    config_lib.apply_overrides(
        config,
        {
            "train.steps": "1e3",
            "train.learning_rate": "0.01",
            "progress": "false",
            "model.remat": "dots",
        },
    )
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)
    assert config.train.learning_rate == 0.01 and config.progress is False
    assert config.model.remat == "dots"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train.stepz": "3"}, "unknown config key 'train.stepz'; keys under 'train'"),
        ({"train.steps": "abc"}, "config.train.steps='abc' is not a valid int"),
        ({"train.steps": "2.5"}, "is not a valid int"),
        ({"progress": "maybe"}, "is not a valid bool"),
        ({"train": "3"}, "is a group"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        config_lib.apply_overrides(config_lib.base_config(), overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model.d_model": "100", "model.n_heads": "3"}, "not divisible by model.n_heads=3"),
        ({"model.n_layer": "0"}, "model.n_layer=0"),
        ({"train.steps": "0"}, "train.steps=0 must be positive"),
        ({"train.warmup_steps": "500"}, "warmup_steps=500"),
        ({"model.vocab_size": "100"}, "too small for the byte tokenizer"),
        ({"train.microbatches": "-1"}, "train.microbatches=-1 must be 0"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    config = config_lib.base_config()
    config_lib.apply_overrides(config, overrides)
    with pytest.raises(UserError, match=message):
        config_lib.validate(config)


def test_run_id_follows_what_is_trained_not_where_it_is_written():
    a, b = config_lib.base_config(), config_lib.base_config()
    b.store, b.workdir, b.progress, b.mesh.data = "/elsewhere.sqlite", "/w", False, 1
    b.train.microbatches = 4  # the same update, taken in parts
    assert config_lib.run_id(a) == config_lib.run_id(b)
    b.train.learning_rate = 1e-3
    assert config_lib.run_id(a) != config_lib.run_id(b)


def test_colliding_sweep_members_are_refused(tmp_path):
    study = tmp_path / "twins.py"
    study.write_text(
        "from launch.config import base_config\n"
        "def get_config(arg=None):\n    return base_config()\n"
        "def get_sweep(arg=None):\n    return [{'seed': 1}, {'seed': 1}]\n"
    )
    with pytest.raises(UserError, match="collide on run id"):
        config_lib.study_sweep(str(study))


def test_missing_study_file():
    with pytest.raises(UserError, match="does not exist"):
        config_lib.study_config("experiments/nope.py")


@pytest.mark.parametrize(
    "name", ["/abs/evil", "../../evil", "a/b", "new\nline", "x" * 5000, ".hidden", "sp ace"]
)
def test_sweep_names_that_would_escape_their_folder_are_refused(name, tmp_path, capsys):
    with pytest.raises(UserError, match="sweep name .* is not allowed"):
        config_lib.study_config("experiments/local_cpu.py:tiny", {"sweep_name": name})
    # Figures and reports are named after the sweep: refused before any path is built.
    from launch.cli import main

    store = str(tmp_path / "s.sqlite")
    for command in (["plot", name, "--kind", "all"], ["report", name]):
        assert main([*command, "--store", store]) == 2
        err = capsys.readouterr().err
        assert "is not allowed" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plain_sweep_names_pass():
    for name in ("local_cpu", "kaplan2020", "a.b-c_1", "x" * 64):
        config = config_lib.study_config("experiments/local_cpu.py:tiny", {"sweep_name": name})
        assert config.sweep_name == name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "def get_config(arg=None):\n    return base_config()\ndef get_sweep(arg=None):\n"
            "    return []\n",
            "get_sweep\\(\\) of .* returned '\\[\\]'",
        ),
        (
            "def get_config(arg=None):\n    return base_config()\ndef get_sweep(arg=None):\n"
            "    return None\n",
            "get_sweep\\(\\) of .* returned 'None'",
        ),
        (
            "def get_config(arg=None):\n    return {'a': 1}\ndef get_sweep(arg=None):\n"
            "    return [{}]\n",
            "get_config\\(\\) of 'bad' returned a dict",
        ),
        (
            "def get_config(arg=None):\n    return base_config()\ndef get_sweep(arg=None):\n"
            "    return [1, 2]\n",
            "must return a non-empty list of dicts",
        ),
        (
            "def get_config(arg=None):\n    raise RuntimeError('no GPU here')\n"
            "def get_sweep(arg=None):\n    return [{}]\n",
            "get_config\\(\\) of .*bad.py' failed: RuntimeError: no GPU here \\(line 3\\)",
        ),
        ("def get_config(arg=None)\n    return 1\n", "failed to load: SyntaxError: .*line 2"),
        ("import not_a_module_anywhere\n", "failed to load: ModuleNotFoundError"),
    ],
)
def test_study_files_that_return_nothing_usable_are_one_line(body, message, tmp_path):
    study = tmp_path / "bad.py"
    study.write_text("from launch.config import base_config\n" + body)
    with pytest.raises(UserError, match=message):
        config_lib.study_sweep(str(study))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.learning_rate": "inf"}, "must be a finite number > 0"),
        ({"train.learning_rate": "nan"}, "must be a finite number > 0"),
        ({"train.steps": "1000000000000"}, "is more than 10,000,000"),
        ({"eval.points": "1000000000"}, "is more than 10,000,000"),
    ],
)
def test_values_out_of_range_are_refused_before_anything_runs(overrides, message):
    with pytest.raises(UserError, match=message):
        config_lib.study_config("experiments/local_cpu.py:tiny", overrides)
