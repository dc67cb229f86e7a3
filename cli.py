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
import warnings
from dataclasses import dataclass
from typing import Callable


@dataclass
class Command:
    help: str
    main: Callable[[argparse.Namespace, list[str]], int]
    config: Callable[[], type] | None = None   # recipe config class, for --help and validation
    distributed: bool = False                  # accepts --nproc / --dist
    model_flag: bool = False                   # accepts --model (= model.source)
    passthrough: str = ""                      # module whose main(argv) parses its own flags
    example: str = "train.lr=3e-4"             # an override its config accepts (shown by --help)


def _recipe(module_name: str, actions: dict[str, str] | None = None) -> Callable[[argparse.Namespace, list[str]], int]:
    """Load the config (YAML + overrides), then run the recipe, possibly in N processes.

    ``actions`` maps an optional first word (``cogcore distill cache``) to another function
    of the recipe module taking the same config.
    """
    actions = actions if actions is not None else {"": "run"}

    def main(args: argparse.Namespace, overrides: list[str]) -> int:
        from cogcore.train.config import ConfigError, load_config
        # `cogcore sft configs/sft/tiny.yaml`: a YAML file given without --config is the config
        yaml_words = [w for w in overrides if "=" not in w and w.endswith((".yaml", ".yml"))]
        if yaml_words and args.config is None:
            args.config = yaml_words[0]
            overrides.remove(yaml_words[0])
        action = ""
        if overrides and "=" not in overrides[0]:
            action = overrides.pop(0)
        if action not in actions:
            named = ", ".join(a for a in actions if a)
            example = COMMANDS[args.command].example
            if not action:
                raise ConfigError(f"say what to run: cogcore {args.command} {{{named}}}")
            raise ConfigError(f"'{action}' is neither key=value (e.g. {example}) nor one of: {named}" if named else
                              f"'{action}' is not key=value (e.g. {example}); a config file goes after --config")
        # --model / --out are short for the config keys model.source / out
        if getattr(args, "model", None):
            overrides.insert(0, f"model.source={args.model}")
        if getattr(args, "out", None):
            overrides.insert(0, f"out={args.out}")
        cfg_cls = COMMANDS[args.command].config()
        cfg = load_config(cfg_cls, args.config, overrides)  # validate before launching anything
        if getattr(args, "nproc", 1) > 1:
            from cogcore.train.distributed import launch
            return launch(_without_launch_flags(args.argv), args.nproc, args.dist)
        module = __import__(module_name, fromlist=["run"])
        getattr(module, actions[action])(cfg)
        from cogcore.train.distributed import teardown
        teardown()  # a no-op in one process; under torchrun every rank leaves the group cleanly
        return 0

    return main


def _without_launch_flags(argv: list[str]) -> list[str]:
    """argv minus --nproc/--dist (the children run the same command in one process each)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--dist"):
            skip = True
        elif not a.startswith(("--nproc=", "--dist=")):
            out.append(a)
    return out


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


def _passthrough(module_name: str) -> Callable[[argparse.Namespace, list[str]], int]:
    """A command with its own flags (`cogcore memory ingest --user U FILE`): the module's
    ``main(argv)`` parses everything after the command name, --help included."""
    def main(args: argparse.Namespace, rest: list[str]) -> int:
        module = __import__(module_name, fromlist=["main"])
        return module.main(rest)
    return main


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    """`cogcore bench <name> [flags]`: run a benchmark script's main with the remaining flags."""
    from cogcore.train.config import ConfigError
    scripts = {"kernels": "cogcore.bench.bench_kernels", "distill": "cogcore.bench.bench_distill",
               "memory": "cogcore.bench.bench_memory", "refresh": "cogcore.bench.bench_refresh",
               "brainrot": "cogcore.bench.bench_brainrot", "serve": "cogcore.bench.bench_serve",
               "gate": "cogcore.bench.bench_gate"}
    if not rest or rest[0] not in scripts:
        raise ConfigError(f"say which benchmark: cogcore bench {{{', '.join(scripts)}}} [--help for its flags]")
    module = __import__(scripts[rest[0]], fromlist=["main"])
    return module.main(rest[1:])


COMMANDS: dict[str, Command] = {
    "info": Command("show the workspace, devices and available models", _info),
    "sft": Command("supervised fine-tuning / continued pretraining (full or LoRA) on the one training loop",
                   _recipe("cogcore.train.sft"), lambda: __import__("cogcore.train.sft", fromlist=["x"]).SFTConfig,
                   distributed=True),
    "distill": Command("distill a student from a teacher; `distill cache` stores teacher top-k, `distill prune` "
                       "only builds the pruned student",
                       _recipe("cogcore.distill.recipe", {"": "run", "cache": "run_cache", "prune": "run_prune"}),
                       lambda: __import__("cogcore.distill.recipe", fromlist=["x"]).DistillConfig, distributed=True),
    "bench": Command("benchmarks side by side with peers: `bench kernels|distill|memory|refresh|brainrot|serve|gate` "
                     "(each writes bench/results/*.json; --help for its flags)", _bench),
    "experiment": Command("end-to-end experiments: `experiment cognitive-core` (teacher vs plain KD vs knowledge-"
                          "shedding student on a synthetic world)",
                          _recipe("cogcore.distill.cognitive_core", {"cognitive-core": "run"}),
                          lambda: __import__("cogcore.distill.cognitive_core", fromlist=["x"]).ExperimentConfig),
    "memory": Command("the per-user experience log: `memory ingest|stats|export|forget|notes|consolidate`",
                      _passthrough("cogcore.memory.cli"), passthrough="cogcore.memory.cli"),
    "refresh": Command("refresh users' LoRA adapters on their consolidated experience, gate and publish "
                       "(`--user U` or `--all-due`)", _passthrough("cogcore.lora.refresh"),
                       passthrough="cogcore.lora.refresh"),
    "adapters": Command("the adapter registry: `adapters list|show|rollback|gc`",
                        _passthrough("cogcore.lora.cli"), passthrough="cogcore.lora.cli"),
    "sleep": Command("consolidate -> refresh -> gate -> publish for every due user, once or `--every` interval",
                     _passthrough("cogcore.lora.sleep"), passthrough="cogcore.lora.sleep"),
    "serve": Command("OpenAI-compatible HTTP server: one core, many users' adapters swapped per request",
                     _passthrough("cogcore.serve.cli"), passthrough="cogcore.serve.cli"),
    "demo": Command("the whole loop on the embedded default: serve users, log, sleep, refresh, wake better",
                    _passthrough("cogcore.demo.run"), passthrough="cogcore.demo.run"),
    "eval": Command("evaluate a model: `eval core` = recall vs context use (real-world probes, synthetic world)",
                    _recipe("cogcore.eval.core", {"core": "run"}),
                    lambda: __import__("cogcore.eval.core", fromlist=["x"]).EvalConfig, model_flag=True,
                    example="n_per_metric=50"),
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
            p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {cmd.example}")
            p.add_argument("--out", help="output / run directory (the config key `out`)")
            if cmd.model_flag:
                p.add_argument("--model", help="the model (the config key `model.source`)")
        if cmd.distributed:
            p.add_argument("--nproc", type=int, default=1, help="number of processes (torch.distributed.run)")
            p.add_argument("--dist", default="ddp",
                           help="distributed strategy: ddp, fsdp2, zero2, zero3, or an accelerate config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # peft asks every model for transformers' deprecated `is_gradient_checkpointing`, and
    # recent transformers warn on each ask: noise in every run's output that no user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Commands with their own flags get everything after their name, --help included.
    home_at = argv.index("--home") if "--home" in argv else -1
    home_value = home_at + 1 if home_at >= 0 else -1
    first = next((i for i, a in enumerate(argv) if not a.startswith("-") and i != home_value), None)
    if first is not None and argv[first] in COMMANDS and COMMANDS[argv[first]].passthrough:
        if home_at >= 0 and home_at + 1 < len(argv):
            from cogcore.train.workspace import set_home
            set_home(argv[home_at + 1])
        name = argv[first]
        return _run_command(name, argparse.Namespace(command=name), argv[first + 1:], "interrupted")
    # Only build the (slow-to-import) config help for the subcommand asking for --help.
    wants = next((a for a in argv if a in COMMANDS), None) if ("-h" in argv or "--help" in argv) else None
    if wants == "bench" and argv.index("bench") + 1 < len(argv) and argv[argv.index("bench") + 1] in (
            "kernels", "distill", "memory", "refresh", "brainrot", "serve", "gate"):
        i = argv.index("bench")
        return COMMANDS["bench"].main(argparse.Namespace(command="bench"), argv[i + 1:])
    parser = build_parser(wants)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    if args.home:
        from cogcore.train.workspace import set_home
        set_home(args.home)
    overrides = list(getattr(args, "overrides", []) or []) + unknown
    return _run_command(args.command, args, overrides,
                        "interrupted; rerun the same command to resume from the last checkpoint")


def _run_command(name: str, args: argparse.Namespace, rest: list[str], on_interrupt: str) -> int:
    """Run one command; errors a user can fix are one line on stderr and exit code 2."""
    from cogcore.train.config import CogcoreError, ConfigError
    try:
        return COMMANDS[name].main(args, rest)
    except ConfigError as e:
        print(f"cogcore {name}: config error: {e}", file=sys.stderr)
        return 2
    except CogcoreError as e:
        print(f"cogcore {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
