"""`cogcore` command line: a dispatch table, one subcommand per recipe.

    cogcore [--home DIR] <command> [--config FILE] [key=value ...] [--nproc N --dist NAME]

Every recipe subcommand takes a YAML ``--config`` plus ``key=value`` overrides (nested keys
with dots: ``train.lr=3e-4``) and is also a Python function ``run(cfg)`` with the same config.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable


@dataclass
class Command:
    help: str
    main: Callable[[argparse.Namespace, list[str]], int]
    config: Callable[[], type] | None = None   # recipe config class, for --help and validation
    distributed: bool = False                  # accepts --nproc / --dist


def _recipe(run_name: str) -> Callable[[argparse.Namespace, list[str]], int]:
    """Load the config (YAML + overrides), then run the recipe, possibly in N processes."""

    def main(args: argparse.Namespace, overrides: list[str]) -> int:
        from cogcore.train.config import load_config
        cfg_cls = COMMANDS[args.command].config()
        cfg = load_config(cfg_cls, args.config, overrides)  # validate before launching anything
        if getattr(args, "nproc", 1) > 1:
            from cogcore.train.distributed import launch
            argv = [a for a in sys.argv[1:] if a not in ("--nproc", str(args.nproc), "--dist", args.dist)
                    and not a.startswith(("--nproc=", "--dist="))]
            return launch(argv, args.nproc, args.dist)
        module = __import__(run_name, fromlist=["run"])
        module.run(cfg)
        return 0

    return main


def _info(args: argparse.Namespace, rest: list[str]) -> int:
    import platform

    import torch
    from cogcore import __version__
    from cogcore.train.model import EMBEDDED_DEFAULT, TINY_PRESETS
    from cogcore.train.workspace import get_workspace
    ws = get_workspace()
    print(f"cogcore {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"device: {'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'} "
          f"({os.cpu_count()} cores)")
    print(f"workspace (--home / COGCORE_HOME): {ws.root}")
    for name, path in ws.layout().items():
        print(f"  {name:<14} {path}")
    print(f"models: {EMBEDDED_DEFAULT} (embedded default), presets: {', '.join(TINY_PRESETS)}")
    return 0


COMMANDS: dict[str, Command] = {
    "info": Command("show the workspace, devices and available models", _info),
    "sft": Command("supervised fine-tuning / continued pretraining (full or LoRA) on the one training loop",
                   _recipe("cogcore.train.sft"), lambda: __import__("cogcore.train.sft", fromlist=["x"]).SFTConfig,
                   distributed=True),
}


def _config_help(cfg_cls: type) -> str:
    from cogcore.train.config import describe
    lines = ["config keys (set in --config YAML or as key=value):"]
    for key, typ, help_ in describe(cfg_cls):
        lines.append(f"  {key}  ({typ})")
        lines.extend("      " + ln for ln in textwrap.wrap(help_, 90))
    return "\n".join(lines)


def build_parser(with_config_help: str | None = None) -> argparse.ArgumentParser:
    from cogcore.train.workspace import default_home
    parser = argparse.ArgumentParser(
        prog="cogcore", description="Distill, personalize and serve small cognitive-core language models.",
        epilog=f"workspace: {default_home()} (change with --home DIR or COGCORE_HOME)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="workspace directory holding all cogcore state")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in COMMANDS.items():
        epilog = _config_help(cmd.config()) if (cmd.config and with_config_help == name) else None
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if cmd.config:
            p.add_argument("--config", help="YAML config file (see configs/)")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
        if cmd.distributed:
            p.add_argument("--nproc", type=int, default=1, help="number of processes (torch.distributed.run)")
            p.add_argument("--dist", default="ddp",
                           help="distributed strategy: ddp, fsdp2, zero2, zero3, or an accelerate config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only build the (slow-to-import) config help for the subcommand asking for --help.
    wants = next((a for a in argv if a in COMMANDS), None) if ("-h" in argv or "--help" in argv) else None
    parser = build_parser(wants)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.home:
        from cogcore.train.workspace import set_home
        set_home(args.home)
    overrides = list(getattr(args, "overrides", []) or []) + unknown
    from cogcore.train.config import CogcoreError, ConfigError
    try:
        return COMMANDS[args.command].main(args, overrides)
    except ConfigError as e:
        print(f"cogcore {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except CogcoreError as e:
        print(f"cogcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
