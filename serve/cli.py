"""`cogcore serve`: the OpenAI-compatible multi-LoRA server (or vLLM with the registry's adapters).

    cogcore serve                                   # embedded SmolLM2 core on 127.0.0.1:8000
    cogcore serve --model tiny-llama --port 0       # any free port; prints `listening on http://...`
    cogcore serve --keys keys.yaml --log-experience --notes
    cogcore serve --engine vllm --adapters-on-device 16    # hand the same adapters to vLLM (GPU)

From Python: `cogcore.serve.app.Server(cfg)` runs it in-process (a thread), and
`cogcore.serve.cli.spawn_server([...])` runs it as a subprocess and returns once it listens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cogcore.train.config import CogcoreError

READY = "listening on "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogcore serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m", help="preset (smollm2-135m, tiny-llama), HF directory or .gguf")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    g.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="serve a bitsandbytes-quantized base with the adapters on top")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="Python GIL switch interval: short keeps decoding fast while HTTP is busy")
    g = p.add_argument_group("http")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000, help="0 = a free port")
    g.add_argument("--keys", default="", help="API keys file (YAML/JSON); env COGCORE_API_KEYS='key:user,...'")
    g.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when a request gives none")
    g = p.add_argument_group("batching and adapters")
    g.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    g.add_argument("--adapters-on-device", type=int, default=8, help="adapter slots on the device")
    g.add_argument("--cpu-adapters", type=int, default=64, help="adapters cached in CPU memory")
    g.add_argument("--max-rank", type=int, default=0, help="slot rank (0 = the registry's largest, else 16)")
    g.add_argument("--target-modules", default="", help="comma-separated layer names with adapter slots")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    g.add_argument("--lora-impl", default="auto", choices=["auto", "torch", "loop", "triton"])
    g = p.add_argument_group("memory")
    g.add_argument("--log-experience", action="store_true", help="log exchanges and /v1/feedback for each user")
    g.add_argument("--experience-url", default="", help="experience log (default: the workspace's)")
    g.add_argument("--notes", action="store_true", help="put the user's notes before chat prompts")
    g.add_argument("--notes-tokens", type=int, default=256, help="token budget of the notes")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="cogcore", choices=["cogcore", "vllm"],
                   help="cogcore's own server, or vLLM with the registry's adapters (GPU)")
    g.add_argument("--print-command", action="store_true", help="with --engine vllm: print the command, do not run it")
    g.add_argument("--adapters", default="", help="registry root (default: the workspace's adapters/)")
    return p


def config_from_args(a: argparse.Namespace):
    """The ServeConfig the flags describe (validated)."""
    from cogcore.train.model import ModelSpec

    from .app import ServeConfig
    from .engine import EngineConfig
    eng = EngineConfig(model=ModelSpec(source=a.model, dtype=a.dtype, quantize=a.quantize), device=a.device,
                       max_batch=a.max_batch, max_queue=a.max_queue, adapters_on_device=a.adapters_on_device,
                       cpu_adapters=a.cpu_adapters, max_rank=a.max_rank,
                       target_modules=[t for t in a.target_modules.split(",") if t], request_timeout=a.timeout,
                       max_tokens_limit=a.max_tokens_limit, lora_impl=a.lora_impl)
    return ServeConfig(engine=eng, host=a.host, port=a.port, keys=a.keys, log_experience=a.log_experience,
                       experience_url=a.experience_url, notes=a.notes, notes_tokens=a.notes_tokens,
                       default_max_tokens=a.default_max_tokens)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:  # ModelSpec and friends validate in __post_init__
        raise CogcoreError(str(e)) from None
    from cogcore.lora.registry import AdapterRegistry
    registry = AdapterRegistry(args.adapters or None)
    if args.engine == "cogcore":  # refuse a bad keys file before the model loads
        from .app import KeyRing
        KeyRing.load(cfg.keys or None, os.environ.get("COGCORE_API_KEYS"))
    if args.engine == "vllm":
        from .vllm import run_vllm
        return run_vllm(cfg, registry, print_only=args.print_command)
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # The decode thread gives up the GIL in every torch op; under an HTTP flood the event loop
    # holds it for the default 5 ms each time (convoy). A shorter interval keeps decoding going.
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    from .app import Server
    t0 = time.perf_counter()
    server = Server(cfg, registry=registry)
    eng = server.engine
    n_adapters = len(registry.list())
    print(f"cogcore serve: model {cfg.engine.model.source} (base {str(eng.base_hash)[:12]}), {n_adapters} adapter "
          f"versions in {registry.root}, {cfg.engine.adapters_on_device} device slots of rank {eng.max_rank} on "
          f"{', '.join(eng.target_modules)}; API keys: {'open (no keys)' if server.keys.open else len(server.keys)}; "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    server.serve_forever(on_ready=lambda url: print(f"{READY}{url}", flush=True))
    return 0


# ---------------------------------------------------------------------------- as a subprocess


class ServerProcess:
    """A `cogcore serve` subprocess that listens: `.url`, `.pid`, `.stop()`; output kept in `.lines`."""

    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful: in-flight requests end), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_server(args: list[str], *, timeout: float = 120.0, env: dict | None = None, home: str | None = None,
                 log_file: str | Path | None = None) -> ServerProcess:
    """Start `cogcore [--home HOME] serve ARGS` and return once it prints `listening on http://...`.

    Pass `--port 0` to get a free port. Raises CogcoreError (with the output) if it exits or
    does not get ready within `timeout` seconds; the process is killed then.
    """
    cmd = [sys.executable, "-u", "-m", "cogcore.cli", *(["--home", str(home)] if home else []), "serve", *args]
    err = open(log_file, "ab") if log_file else subprocess.STDOUT
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                            env={**os.environ, **(env or {})})
    if log_file:
        err.close()
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read():
        for line in proc.stdout:  # keep draining so the server never blocks on a full pipe
            lines.append(line.rstrip("\n"))
            if line.startswith(READY) and not ready.is_set():
                url.append(line[len(READY):].strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True, name=f"serve-{proc.pid}-stdout").start()
    if not ready.wait(timeout) or not url:
        proc.kill()
        proc.wait(5)
        tail = "\n".join(lines[-30:])
        raise CogcoreError(f"`cogcore serve` did not become ready within {timeout:g} s (rc {proc.returncode}):\n{tail}")
    return ServerProcess(proc, url[0], lines)


__all__ = ["ServerProcess", "build_parser", "config_from_args", "main", "spawn_server"]
