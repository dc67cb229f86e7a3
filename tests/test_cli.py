import re

import pytest

from cogcore.cli import COMMANDS, build_parser
from cogcore.train.config import load_config


def test_dispatch_table_matches_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, cmd in COMMANDS.items():
        assert cmd.help and "\n" not in cmd.help, name


def test_help_lists_every_command(cli):
    out = cli("--help", check=True).stdout
    for name in COMMANDS:
        assert name in out
    assert "workspace" in out


def test_every_subcommand_has_help(cli):
    for name in COMMANDS:
        proc = cli(name, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), name


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.config])
def test_recipe_help_lists_every_key_of_its_own_config(cli, name):
    """Each key of the command's config, with its type, as the help's key list prints it."""
    from cogcore.train.config import describe
    out = cli(name, "--help", check=True).stdout
    listed = re.findall(r"^  (\S+)  \(", out.split("config keys", 1)[1], flags=re.M)
    assert listed == [key for key, _, _ in describe(COMMANDS[name].config())]


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.config])
def test_the_override_that_help_suggests_is_accepted(cli, name):
    out = cli(name, "--help", check=True).stdout
    example = re.search(r"config overrides, e\.g\. (\S+=\S+)", out).group(1)
    load_config(COMMANDS[name].config(), None, [example])


def test_info_prints_workspace(cli, tmp_path):
    out = cli("--home", str(tmp_path / "ws"), "info", check=True).stdout
    assert str(tmp_path / "ws") in out and "adapters" in out


def test_bad_key_is_one_paragraph_not_a_traceback(cli):
    proc = cli("sft", "train.lrr=1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown config key 'train.lrr'" in proc.stderr and "Did you mean 'train.lr'" in proc.stderr


def test_missing_model_path_is_explained(cli, tmp_path):
    proc = cli("sft", f"model.source={tmp_path}/no-such-model", "train.max_steps=1", "train.warmup_steps=0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not found locally" in proc.stderr and "model.source" in proc.stderr


def test_missing_data_file_is_explained(cli, tmp_path):
    proc = cli("sft", "model.source=tiny-llama", f"data.source={tmp_path}/none.jsonl")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr


def test_a_config_file_without_config_flag_is_the_config(cli):
    proc = cli("sft", "configs/sft/tiny.yaml", "train.lrr=1")  # the YAML loads, then the bad key is named
    assert proc.returncode == 2 and "unknown config key 'train.lrr'" in proc.stderr
    proc = cli("sft", "tiny")
    assert proc.returncode == 2 and "'tiny' is not key=value (e.g. train.lr=3e-4)" in proc.stderr
    proc = cli("distill", "prune", "configs/distill/tiny.yaml", "student.prune.layers=-1")
    assert proc.returncode == 2 and "prune.layers=-1 must be >= 0" in proc.stderr
