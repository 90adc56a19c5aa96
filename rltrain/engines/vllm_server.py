"""Starting, watching and stopping a ``vllm serve`` process built from a recipe.

The command is a pure function of the recipe (:func:`build_vllm_command`, tested on CPU), so what rltrain runs,
what ``python -m rltrain.engines.vllm_server RECIPE --print`` shows and what the multi-GPU script starts are the
same. Settings that training depends on are imposed, not left to the model's defaults:

* ``--generation-config vllm``: sampling defaults come from vLLM, not from the model's
  ``generation_config.json`` (Qwen2.5's ships ``top_k=20, repetition_penalty=1.05``, which would make the sampled
  distribution differ from the one the trainer scores);
* ``--logprobs-mode processed_logprobs``: returned logprobs are taken after temperature scaling, which is what
  TRL recomputes and compares for its importance-sampling correction;
* ``--host 127.0.0.1``: the server has no authentication and, with runtime LoRA loading, loads any path it is
  given, so it is reachable from this machine only;
* adapter sync: ``--enable-lora --max-lora-rank R`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (the
  ``/v1/load_lora_adapter`` routes exist only then); merged sync: the NCCL weight-transfer engine that TRL's
  server mode pushes weights through, and ``VLLM_SERVER_DEV_MODE=1`` for its routes.

:class:`VLLMServer` runs the command in a session of its own (so Ctrl-C reaches the trainer, which then stops vLLM
and all its worker processes together), logs to a file, waits for ``/health``, reports a process that died or
never became healthy with its exit status and the end of its log, restarts on request, and is stopped at
interpreter exit if nobody stopped it before.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from rltrain.engines.base import EngineError
from rltrain.recipes import Recipe, load_recipe

logger = logging.getLogger(__name__)

#: lines of the server log quoted in error messages
LOG_TAIL_LINES = 25
#: how long ``stop`` waits after SIGTERM before SIGKILL (vLLM frees GPU memory and joins its workers)
STOP_GRACE_S = 30.0
#: how long a dropped connection waits for the server process to finish dying before it counts as alive
DEATH_GRACE_S = 5.0


class VLLMStartupError(EngineError):
    """The vLLM server could not be started, died while starting, or never answered ``/health``."""


class VLLMPortTakenError(VLLMStartupError):
    """Another process listens on the server's port: ``/health`` answered, but not from the process rltrain
    started (a port found free is bound by someone else before vLLM binds it; the started server then dies)."""


def build_vllm_command(recipe: Recipe, model_dir: str | Path, port: int) -> list[str]:
    """The ``vllm serve`` command line for ``recipe`` serving ``model_dir`` as ``recipe.model.name``."""
    config = recipe.engine.vllm
    command = [
        *config.program(), "serve", str(model_dir),
        "--served-model-name", recipe.model.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", config.dtype or recipe.model.dtype,
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--seed", str(recipe.seed),
        "--generation-config", "vllm",
        "--logprobs-mode", "processed_logprobs",
    ]
    if config.max_model_len is not None:
        command += ["--max-model-len", str(config.max_model_len)]
    if recipe.model.device == "cpu":
        # vLLM's CPU build dies on a request that carries a seed while chunked prefill splits its prompt
        # ("CPU Generator does not use offset", then EngineDeadError); the gateway forwards agents' seeds
        command += ["--no-enable-chunked-prefill"]
    if config.weight_sync == "adapter":
        command += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank)]
    else:
        command += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return command + list(config.extra_args)


def vllm_environment(recipe: Recipe, base: dict[str, str] | None = None, replica: int = 0) -> dict[str, str]:
    """The environment of the server process: ``base`` (the current one by default) plus what weight sync needs;
    with ``engine.vllm.replicas`` > 1 on GPU, replica ``replica`` sees only its own GPUs."""
    env = dict(os.environ if base is None else base)
    if recipe.engine.vllm.replicas > 1 and recipe.model.device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(replica_devices(recipe, replica, env.get("CUDA_VISIBLE_DEVICES")))
    if recipe.model.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(recipe.engine.vllm.cpu_kv_cache_gib)
    if recipe.engine.vllm.weight_sync == "adapter":
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    else:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def replica_devices(recipe: Recipe, replica: int, visible: str | None) -> list[str]:
    """The GPUs of replica ``replica``: the ``replica``-th run of ``tensor_parallel_size`` devices among ``visible``
    (a CUDA_VISIBLE_DEVICES value; None = every GPU torch sees), so that replicas never share a GPU."""
    config = recipe.engine.vllm
    if visible is None:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    needed = config.replicas * config.tensor_parallel_size
    if needed > len(devices):
        raise VLLMStartupError(
            f"engine.vllm.replicas={config.replicas} x tensor_parallel_size={config.tensor_parallel_size} needs "
            f"{needed} GPUs, but {len(devices)} are visible ({','.join(devices) or 'none'}); lower replicas or "
            "show more GPUs"
        )
    size = config.tensor_parallel_size
    return devices[replica * size:(replica + 1) * size]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the server binds it a moment later; a race is reported at startup)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening_pids(port: int) -> set[int] | None:
    """The processes holding a socket that listens on TCP ``port`` on this machine, from Linux's ``/proc``; None
    where ``/proc`` cannot tell (another system, or processes whose descriptors cannot be read)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl, local address (hex ip:port), remote address, state (0A: LISTEN), ..., inode
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids: set[int] = set()
    for proc in Path("/proc").iterdir() if inodes else ():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids or None


class VLLMServer:
    """One supervised ``vllm serve`` process at ``base_url`` (restarts reuse the same command and port)."""

    def __init__(
        self, command: Sequence[str], env: dict[str, str], *, base_url: str, log_path: Path,
        startup_timeout_s: float, max_restarts: int,
    ) -> None:
        self.command = list(command)
        self.env = env
        self.base_url = base_url.rstrip("/")
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        #: how many times the process was started (a request remembers it to tell a restart it missed)
        self.generation = 0
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def can_restart(self) -> bool:
        return self.restarts < self.max_restarts

    def has_died(self, grace_s: float = DEATH_GRACE_S) -> bool:
        """Whether the process exited (a crashing process drops its connections a moment before it is gone, so
        a dropped connection waits up to ``grace_s`` for the exit)."""
        if self._process is None or self._stopped:
            return False
        try:
            self._process.wait(grace_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def start(self) -> None:
        """Start the process and return once ``/health`` answers 200; raises :class:`VLLMStartupError`."""
        if self.alive:
            raise VLLMStartupError(f"the vLLM server at {self.base_url} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== rltrain starts: {shlex.join(self.command)}\n".encode())
            log.flush()
            try:
                self._process = subprocess.Popen(
                    self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise VLLMStartupError(
                    f"engine.vllm.command: {self.command[0]!r} was not found. Install vLLM (`make vllm` on CPU, "
                    "`pip install 'rltrain[gpu]'` or the image of Dockerfile.gpu on GPU), point engine.vllm.command at "
                    "its `vllm` program, or set engine.vllm.url to a server that is already running"
                ) from None
        self.generation += 1
        self._stopped = False
        atexit.register(self.stop)
        logger.info("started vLLM (pid %d) for %s; log: %s", self.pid, self.base_url, self.log_path)
        self._wait_healthy(started)
        logger.info("vLLM at %s is ready after %.0f s", self.base_url, time.monotonic() - started)

    def _wait_healthy(self, started: float) -> None:
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self._process.poll() if self._process is not None else None
                if code is not None:
                    raise VLLMStartupError(f"the vLLM server exited while starting: {self.describe_exit()}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        self._check_port_is_ours()
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise VLLMStartupError(
                        f"the vLLM server at {self.base_url} did not answer /health within "
                        f"engine.vllm.startup_timeout_s={self.startup_timeout_s:g} s, so it was stopped; "
                        f"{self._log_tail()}"
                    )
                time.sleep(0.5)

    def _check_port_is_ours(self) -> None:
        """Raise :class:`VLLMPortTakenError` (and stop the started process) when what answered ``/health`` is
        another process's server: requests would otherwise go to a stranger that serves another model."""
        port = int(self.base_url.rsplit(":", 1)[1])
        holders = listening_pids(port)
        if holders is None or self._process is None:
            return
        ours = self._process.pid
        strangers = sorted(pid for pid in holders if _process_group(pid) != ours)
        if len(strangers) == len(holders):
            self.stop()
            raise VLLMPortTakenError(
                f"port {port} of {self.base_url} is held by another process (pid {', '.join(map(str, strangers))}), "
                "not by the vLLM server rltrain started; set engine.vllm.port to a free port, or leave it unset for "
                "rltrain to find one"
            )

    def restart(self) -> None:
        """Stop what is left of the process and start it again (counted against ``max_restarts``)."""
        if not self.can_restart:
            raise VLLMStartupError(
                f"the vLLM server died and was already restarted {self.restarts} time(s) "
                f"(engine.vllm.max_restarts={self.max_restarts}): {self.describe_exit()}"
            )
        logger.warning("restarting vLLM at %s: %s", self.base_url, self.describe_exit())
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after :data:`STOP_GRACE_S`; idempotent."""
        process = self._process
        if process is None or self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("vLLM (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, STOP_GRACE_S)
        _signal_group(process.pid, signal.SIGKILL)  # no worker of its group may outlive it
        process.wait()
        if not _wait_group_gone(process.pid, DEATH_GRACE_S):
            logger.warning("processes of vLLM's group %d are still there %.0f s after SIGKILL", process.pid,
                           DEATH_GRACE_S)
        logger.info("vLLM (pid %d) stopped with status %s", process.pid, process.returncode)

    def describe_exit(self) -> str:
        """Exit status (or 'running') and the end of the log, for error messages."""
        code = self._process.poll() if self._process is not None else None
        status = "still running" if code is None else f"exit status {code}"
        return f"pid {self.pid}, {status}; {self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except FileNotFoundError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n" + "\n".join(lines)


#: how many fresh ports a server whose port rltrain picked is tried on when another process takes it first
PORT_ATTEMPTS = 3


def start_server(recipe: Recipe, model_dir: str | Path, replica: int = 0) -> VLLMServer:
    """Start replica number ``replica`` of ``vllm serve`` for the recipe, healthy, on ``engine.vllm.port`` (+
    ``replica``) or on a free port (log: ``<run dir>/vllm.log``, ``vllm-1.log``, ...). A port rltrain picked
    can be bound by another process between the pick and vLLM's bind: then a fresh port is tried."""
    config = recipe.engine.vllm
    attempt = 1
    while True:
        port = config.port + replica if config.port else free_port()
        server = VLLMServer(
            build_vllm_command(recipe, model_dir, port), vllm_environment(recipe, replica=replica),
            base_url=f"http://127.0.0.1:{port}",
            log_path=recipe.run_dir / (f"vllm-{replica}.log" if replica else "vllm.log"),
            startup_timeout_s=config.startup_timeout_s, max_restarts=config.max_restarts,
        )
        try:
            server.start()
        except VLLMPortTakenError as exc:
            if config.port or attempt == PORT_ATTEMPTS:
                raise
            logger.warning("%s; trying another port", exc)
            attempt += 1
        else:
            return server


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of group ``pgid`` is left (workers die a moment after the signal; their memory, a
    few GB on CPU, is free only then). False if some are still there after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own session, so its group id is its pid
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rltrain.engines.vllm_server RECIPE``: run the recipe's vLLM server in the foreground (for
    layouts that start vLLM apart from the trainer, see ``scripts/train_gpu.sh``), or print its command."""
    parser = argparse.ArgumentParser(prog="python -m rltrain.engines.vllm_server", description=main.__doc__)
    parser.add_argument("recipe", help="recipe YAML (engine.kind: vllm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override, as for `rltrain`")
    parser.add_argument("--port", type=int, default=8100, help="port on 127.0.0.1 (default 8100)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the command and exit")
    args = parser.parse_args(argv)
    from rltrain.models import resolve_model

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.engine.vllm.replicas > 1:
        parser.error(f"engine.vllm.replicas={recipe.engine.vllm.replicas}: this runs one server; rltrain starts "
                     "replicas itself, or run this once per server (each on its own --port and GPUs) and list them "
                     "in engine.vllm.urls")
    command = build_vllm_command(recipe, resolve_model(recipe.model.name), args.port)
    env = vllm_environment(recipe)
    added = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if args.print_only:
        sys.stdout.write(" ".join(f"{k}={shlex.quote(v)}" for k, v in added.items()) + " " + shlex.join(command) + "\n")
        return 0
    os.execvpe(command[0], command, env)  # replaces this process: signals reach vLLM directly


if __name__ == "__main__":
    sys.exit(main())
