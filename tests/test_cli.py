from cogcore.cli import COMMANDS, build_parser


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
    for name, cmd in COMMANDS.items():
        proc = cli(name, "--help")
        assert proc.returncode == 0, proc.stderr
        if cmd.config:
            assert "config keys" in proc.stdout and "train.lr" in proc.stdout


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
