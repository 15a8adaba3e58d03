"""The decoding step compiled ahead of time: static shapes, one C++ program, kept on disk.

`generate.decode_one_token` dispatches the ~700 small PyTorch operations of a step from Python, one by
one. Here the same step (the layers' own `step` methods) is written over a cache of fixed capacity, as
gpt-fast does: new keys and values are written in place at a position given as a tensor, and attention
reads the whole capacity through a mask, so the shapes never change while the cache fills. It is
exported (`torch.export`) and compiled by AOTInductor into one C++ function, called once per token.

- **One program per model, batch size and tokens per step**: the capacity is a dynamic dimension (a
  growing cache does not recompile). A dense model has two: one for a single sequence, whose products
  of one row are traced as matrix-vector reductions (`kernels.linear.traced_matvec`, ~2x MKL's `mm` of
  one row; so are those of any program with up to 8 fixed rows: a verification pass of several tokens,
  an MoE program's small batch), and one whose batch size is dynamic too, for every other batch (a
  server's). An MoE model's step gathers each row's chosen experts inside its products (the ids read
  by the kernel, not the host: `moe.Experts._traced_step`), one product per (row, choice), so its batch
  size is fixed per program.
- **Kept on disk** (`~/.cache/sakimi-next/decode`, or $SAKIMI_CACHE_DIR): the next run loads it in well
  under a second. The key holds everything that shapes the code (the config, the weights' format and
  dtype, batch size, torch, the thread count, the CPU's instruction set, this package's source), not the
  weights: those are loaded into the program when it starts, so one compile serves every checkpoint of
  a preset.

The program computes what `decode_one_token` computes (tested: logits within float32 rounding, greedy
tokens equal); the eager step stays the reference.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

from .cache import AttentionCache, Cache, FixedAttentionCache, LinearAttentionCache
from .generate import DecodeFn, decode_one_token
from .model import Qwen3NextForCausalLM
from .util import UserError, atomic_write_text

EXAMPLE_CAPACITY = 64  # the cache length the program is traced with (any length works afterwards)
N_INPUTS = 5  # tokens, next_position, length, window, key_mask; then the states and the weights
# --compile auto: compile a missing program first when a run generates at least this many tokens. Below
# it a first compile (1-4 minutes on a 2-core CPU) costs more than it saves: ~10 ms a token at most.
COMPILE_MIN_TOKENS = 10_000


# ------------------------------------------------------------------------------------- the static step
def step_hidden(model: Qwen3NextForCausalLM, tokens: torch.Tensor, next_position: torch.Tensor,
                length: torch.Tensor, window: torch.Tensor, key_mask: torch.Tensor, layers: list) -> torch.Tensor:
    """`model.decode_hidden` over a fixed-capacity cache: tokens [B, T] at positions next_position [B]
    + 0..T-1, written at cache columns length + 0..T-1 (length: a 0-d tensor); each query sees the
    `window` (0-d; `window_tensor`) columns up to its own; key_mask [B, capacity] (False = padding; True
    from `length` on). Returns the final hidden states [B, T, H]."""
    T = tokens.shape[1]
    x = model.model.embed_tokens(tokens)
    offsets = torch.arange(T, device=tokens.device)
    rope = model.model.rotary_emb(next_position[:, None] + offsets, x.dtype)
    index = (length + offsets)[:, None]  # the cache columns of the new tokens
    columns = torch.arange(key_mask.shape[1], device=tokens.device)
    seen = (columns <= index) & (columns > index - window)  # a row's tokens are contiguous columns
    attn_mask = (key_mask[:, None, :] & seen)[:, None]  # [B, 1, T, capacity]
    for layer, cache in zip(model.model.layers, layers):
        x = layer.step(x, rope, attn_mask, cache, index[:, 0])
    return model.model.norm.step(x)


def window_tensor(cache: Cache) -> torch.Tensor:
    """The cache's attention window as the program reads it (a 0-d tensor, so that one program serves
    every window; no window: more columns than any cache holds)."""
    return torch.tensor(cache.window or 2**62, device=cache.key_mask.device)


def layer_views(cache: Cache) -> list:
    """The cache's layers as the static step reads them (the same tensors)."""
    return [FixedAttentionCache(l.keys, l.values) if isinstance(l, AttentionCache) else l for l in cache.layers]


def state_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every layer's tensors, flat, in the program's argument order."""
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values] if isinstance(layer, AttentionCache) else [layer.conv_window,
                                                                                   layer.recurrent_state]
    return out


class StepProgram(nn.Module):
    """The step as a function of tensors only, what torch.export traces: (tokens [B, T], next_position
    [B], length [], window [], key_mask [B, C], *state_tensors, *weights) -> logits [B, T, V]; updates the states
    and next_position in place. The weights are arguments too (those at `addresses`, see
    `step_tensors`), so the compiled program holds none: it serves any checkpoint of the same shapes."""

    def __init__(self, model: Qwen3NextForCausalLM, addresses: list[str]):
        super().__init__()
        self.model, self.addresses = model, addresses
        self.n_states = 2 * len(model.config.layer_types)

    def forward(self, tokens, next_position, length, window, key_mask, *tensors):
        states, weights = tensors[:self.n_states], tensors[self.n_states:]
        it = iter(states)
        layers = [FixedAttentionCache(next(it), next(it)) if kind == "full_attention"
                  else LinearAttentionCache(next(it), next(it)) for kind in self.model.config.layer_types]
        with bound(self.model, dict(zip(self.addresses, weights))):
            hidden = step_hidden(self.model, tokens, next_position, length, window, key_mask, layers)
            logits = self.model.step_logits(hidden)
        next_position.add_(tokens.shape[1])
        return logits


# ---------------------------------------------------------------------------- the tensors a step reads
def _cached_tensors(value, path: str):
    """(address, tensor) of the tensors in an `inference_weight` value: a tensor, a tuple of them, or
    a StepLinear / Int8StepLinear (their plain tensors; oneDNN's packed copy is never traced)."""
    if value is None:  # a cache that holds nothing (an MoE's int8 copy of float weights)
        return
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from _cached_tensors(v, f"{path}.{i}")
    else:
        for name, v in vars(value).items():
            if isinstance(v, torch.Tensor) and not v.is_mkldnn:
                yield f"{path}.{name}", v


def step_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the decoding step can read, by a stable address: parameters, buffers and the fused
    decoding weights (`inference_weight`'s caches, made by one eager step first)."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    for name, module in model.named_modules():
        for attr, cached in vars(module).items():
            if isinstance(cached, tuple) and len(cached) == 2 and isinstance(cached[0], tuple):
                out.update(_cached_tensors(cached[1], f"{name}.{attr}" if name else attr))
    return out


def _holder(model: nn.Module, address: str):
    """(object, key, kind) where the tensor at `address` lives: a parameter or buffer slot of a module,
    an attribute of a decoding weight, or an item of a tuple of them."""
    names = address.split(".")
    for i in range(len(names) - 1, -1, -1):  # the longest module path that exists
        try:
            module = model.get_submodule(".".join(names[:i]))
        except AttributeError:
            continue
        rest = names[i:]
        if len(rest) == 1 and (rest[0] in module._parameters or rest[0] in module._buffers):
            return module, rest[0], "module"
        return module, rest, "cached"
    raise KeyError(address)


@contextlib.contextmanager
def bound(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Within: the model reads `tensors` (by `step_tensors` address) instead of its own, so that
    torch.export sees them as the program's arguments. Restores everything afterwards."""
    undo = []
    try:
        for address, t in tensors.items():
            holder, key, kind = _holder(model, address)
            if kind == "module":
                slots = holder._parameters if key in holder._parameters else holder._buffers
                undo.append((slots, key, slots[key]))
                slots[key] = t
            else:
                cache_key, value = holder.__dict__[key[0]]
                undo.append((holder.__dict__, key[0], (cache_key, value)))
                holder.__dict__[key[0]] = (cache_key, _replaced(value, key[1:], t))
        yield
    finally:
        for slots, key, old in reversed(undo):
            slots[key] = old


def _replaced(value, path: list[str], t: torch.Tensor):
    """`value` (a tensor, a tuple, or a decoding weight object) with the tensor at `path` replaced."""
    if not path:
        return t
    if isinstance(value, tuple):
        i = int(path[0])
        return value[:i] + (_replaced(value[i], path[1:], t),) + value[i + 1:]
    twin = copy.copy(value)
    setattr(twin, path[0], _replaced(getattr(value, path[0]), path[1:], t))
    return twin


@torch.inference_mode()
def build_step_weights(model: Qwen3NextForCausalLM, batch_size: int, tokens_per_step: int = 1) -> None:
    """One eager step on a scratch cache: makes every fused decoding weight the program will read."""
    tokens = torch.zeros(batch_size, tokens_per_step, dtype=torch.long, device=model.device)
    model.step_logits(model.decode_hidden(tokens, model.new_cache(batch_size, capacity=tokens_per_step)))


# ----------------------------------------------------------------------------------- compile and cache
def cache_dir() -> Path:
    return Path(os.environ.get("SAKIMI_CACHE_DIR") or Path.home() / ".cache" / "sakimi-next") / "decode"


@functools.cache
def _source_hash() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def program_key(model: Qwen3NextForCausalLM, batch_size: int | None, tokens_per_step: int) -> str:
    """What the compiled code depends on (not the weights' values)."""
    formats = [(name, str(p.dtype), getattr(p, "weight_format", "float")) for name, p in model.named_parameters()]
    parts = {"config": model.config.to_dict(), "formats": formats, "batch": batch_size, "tokens": tokens_per_step,
             "torch": torch.__version__,
             "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
             "device": model.device.type, "source": _source_hash()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _example_inputs(model: Qwen3NextForCausalLM, batch_size: int, tokens_per_step: int) -> tuple:
    cache = model.new_cache(batch_size, capacity=EXAMPLE_CAPACITY)
    cache.reserve(EXAMPLE_CAPACITY)
    dev = model.device
    tokens = torch.zeros(batch_size, tokens_per_step, dtype=torch.long, device=dev)
    return (tokens, cache.next_position, torch.tensor(0, device=dev), window_tensor(cache), cache.key_mask,
            *state_tensors(cache))


def _dynamic_shapes(model: Qwen3NextForCausalLM, args: tuple, dynamic_batch: bool) -> tuple:
    from torch.export import Dim

    capacity = Dim("capacity", min=2, max=max(model.config.max_position_embeddings, EXAMPLE_CAPACITY) + 1024)
    batch = Dim("batch", min=1, max=1024) if dynamic_batch else None

    def spec(i: int, t: torch.Tensor) -> dict | None:
        dims = {0: batch} if batch is not None and t.ndim else {}
        if i == N_INPUTS - 1:  # key_mask
            dims[1] = capacity
        elif i >= N_INPUTS and t.ndim == 4 and model.config.layer_types[(i - N_INPUTS) // 2] == "full_attention":
            dims[2] = capacity
        return dims or None

    specs = [spec(i, t) for i, t in enumerate(args)]
    return (*specs[:N_INPUTS], tuple(specs[N_INPUTS:]))  # the states are StepProgram.forward's *states


def _export(model: Qwen3NextForCausalLM, batch_size: int | None, tokens_per_step: int, addresses: list[str]):
    example_batch = batch_size or 2  # a dynamic batch is traced with 2 rows (1 would be specialised)
    args = _example_inputs(model, example_batch, tokens_per_step)
    tensors = step_tensors(model)
    weights = tuple(tensors[a] for a in addresses)
    shapes = _dynamic_shapes(model, args, batch_size is None)
    shapes = (*shapes[:N_INPUTS], shapes[N_INPUTS] + (None,) * len(weights))
    with torch.no_grad():
        return torch.export.export(StepProgram(model, addresses).eval(), args + weights, dynamic_shapes=shapes)


def used_addresses(model: Qwen3NextForCausalLM, batch_size: int | None, tokens_per_step: int) -> list[str]:
    """The `step_tensors` the step really reads (one export with all of them, keeping those used)."""
    addresses = list(step_tensors(model))
    exported = _export(model, batch_size, tokens_per_step, addresses)
    inputs = [n for n in exported.graph.nodes if n.op == "placeholder"]
    first = len(inputs) - len(addresses)
    return [a for a, node in zip(addresses, inputs[first:]) if node.users]


def compile_program(model: Qwen3NextForCausalLM, batch_size: int | None, tokens_per_step: int,
                    path: Path) -> None:
    """Export and compile the step (batch_size None: any) into an AOTInductor package at `path`, and the
    addresses of the weights it takes as arguments beside it (path .json)."""
    build_step_weights(model, batch_size or 2, tokens_per_step)
    addresses = used_addresses(model, batch_size, tokens_per_step)
    exported = _export(model, batch_size, tokens_per_step, addresses)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.pt2")
    torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"weights": addresses}, indent=1) + "\n")
    os.replace(tmp, path)


class LoadedProgram:
    """A compiled step and the model's tensors it takes as arguments."""

    def __init__(self, path: Path, model: Qwen3NextForCausalLM, batch_size: int | None, tokens_per_step: int):
        addresses = json.loads(path.with_suffix(".json").read_text())["weights"]
        runner = torch._inductor.aoti_load_package(str(path))
        self.run = runner.loader.boxed_run  # a flat list of tensors in, a list out: no pytree per call
        build_step_weights(model, batch_size or 1, tokens_per_step)
        tensors = step_tensors(model)
        self.weights = [tensors[a] for a in addresses]

    def __call__(self, tokens, next_position, length, window, key_mask, states: list[torch.Tensor]) -> torch.Tensor:
        return self.run([tokens, next_position, length, window, key_mask, *states, *self.weights])[0]


def compile_twin(spec: dict) -> None:
    """Compile the program of a model of this shape (`CompiledDecoder.ready`, in a process of its own:
    the live model is not touched; the weights are the program's arguments, so a fresh model of the
    same shape will do). spec: config, dtype, int8, threads, batch_size, tokens_per_step, path."""
    from .config import Config
    from .quantize import quantize_int8

    _end_with_parent(spec["parent"])
    torch.set_num_threads(spec["threads"])
    model = Qwen3NextForCausalLM(Config(**spec["config"]))
    if spec["int8"]:
        quantize_int8(model)
    model.to(getattr(torch, spec["dtype"])).eval()
    compile_program(model, spec["batch_size"], spec["tokens_per_step"], Path(spec["path"]))


def _end_with_parent(parent: int) -> None:
    """A compile outlives nobody: once the process that asked for it is gone (a server stopped or
    killed), end this process group (this process and the compiler it runs)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()


def _start_twin_compile(spec: dict) -> subprocess.Popen:
    """`compile_twin` in a new Python process (a subprocess, not multiprocessing: a server's engine runs
    in a daemonic process, which may not have multiprocessing children)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = "import json, sys; from sakimi_next.decoder import compile_twin; compile_twin(json.loads(sys.argv[1]))"
    log = Path(spec["path"]).with_suffix(".log")  # what went wrong, if anything
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", code, json.dumps({**spec, "parent": os.getpid()})], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def claim_compile(path: Path) -> bool:
    """Whether this process may compile the program at `path` in the background: True once it holds the
    lock file beside it, which it removes when the compile ends. A lock holds while the process that
    wrote it lives (a server's engines share the programs on disk: one compiles, the others wait)."""
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text())
            except (OSError, ValueError):  # being written, or just removed: ask again at the next step
                return False
            if _alive(holder):
                return False
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_compile(path: Path) -> None:
    """The compile that `claim_compile` allowed has ended (or never started)."""
    path.with_suffix(".lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class CompiledDecoder:
    """A `DecodeFn` (model, token [B], cache) -> logits [B, V] that runs the compiled step: loaded from
    disk, or compiled once (minutes on a small CPU) and kept. `compile_seconds` and `load_seconds` say
    what the first use cost. With `background=True` a missing program is compiled in another process
    while the eager step decodes, and taken up as soon as it is ready (a server stays responsive).
    Make a new one after changing the model's weights."""

    def __init__(self, model: Qwen3NextForCausalLM, tokens_per_step: int = 1, directory: Path | None = None,
                 on_compile=None, background: bool = False):
        self.model, self.tokens_per_step = model, tokens_per_step
        self.directory = Path(directory) if directory is not None else cache_dir()
        self.dynamic_batch = not model.config.num_experts  # see the module's docstring
        self.on_compile = on_compile  # called with a message before a compile starts
        self.background = background
        self.programs: dict[int | None, LoadedProgram] = {}
        self.compiling: dict[int | None, subprocess.Popen] = {}  # background compiles: batch -> process
        self._paths: dict[int | None, Path] = {}
        self.compile_seconds = self.load_seconds = 0.0
        self.compiled = 0  # programs compiled by this decoder (not loaded from disk)
        self.failed = False  # a background compile failed: decode eagerly from then on

    def program_batch(self, batch_size: int) -> int | None:
        """The batch size of the program that runs `batch_size` rows (None: any; see the docstring)."""
        return batch_size if not self.dynamic_batch or batch_size == 1 else None

    def path(self, batch_size: int) -> Path:
        b = self.program_batch(batch_size)
        if b not in self._paths:
            self._paths[b] = self.directory / f"step-{program_key(self.model, b, self.tokens_per_step)}.pt2"
        return self._paths[b]

    def is_cached(self, batch_size: int) -> bool:
        path = self.path(batch_size)
        return path.exists() and path.with_suffix(".json").exists()

    def ready(self, batch_size: int) -> bool:
        """Whether the program for this batch size runs now; in the background mode, starts compiling
        it when it is missing (and says False until it is done)."""
        b = self.program_batch(batch_size)
        if b in self.programs or not self.background or self.is_cached(batch_size):
            return True
        process = self.compiling.get(b)
        if process is None and self.compiling:  # one compile at a time (an MoE model's batch sizes)
            return False
        if process is None:
            if not claim_compile(self.path(batch_size)):  # another engine of this server compiles it
                return False
            if self.on_compile is not None:
                self.on_compile(f"compiling the decoding step{'' if b is None else f' for batch {b}'} in the "
                                f"background (once; kept in {self.directory}); decoding eagerly meanwhile")
            weight = self.model.model.embed_tokens.weight
            spec = {"config": self.model.config.to_dict(), "dtype": str(weight.dtype).removeprefix("torch."),
                    "int8": getattr(weight, "weight_format", None) == "int8", "threads": torch.get_num_threads(),
                    "batch_size": b, "tokens_per_step": self.tokens_per_step, "path": str(self.path(batch_size))}
            try:
                self.compiling[b] = _start_twin_compile(spec)
            except OSError as e:
                release_compile(self.path(batch_size))
                self._give_up(f": {e}")
        elif process.poll() is not None:
            del self.compiling[b]
            release_compile(self.path(batch_size))
            if process.returncode != 0:  # not compilable here
                self._give_up(f" (see {self.path(batch_size).with_suffix('.log')})")
        return False

    def _give_up(self, why: str) -> None:
        """Decode eagerly from now on, and say so once."""
        self.failed = True
        if self.on_compile is not None:
            self.on_compile(f"the background compile failed{why}; decoding stays eager")

    def program(self, batch_size: int) -> LoadedProgram:
        """The program for this batch size, loading or compiling it on first use."""
        b = self.program_batch(batch_size)
        if b not in self.programs:
            path = self.path(batch_size)
            if not (path.exists() and path.with_suffix(".json").exists()):
                if self.on_compile is not None:
                    self.on_compile(f"compiling the decoding step{'' if b is None else f' for batch {b}'} "
                                    f"(once; kept in {self.directory})")
                t0 = time.perf_counter()
                compile_program(self.model, b, self.tokens_per_step, path)
                self.compile_seconds += time.perf_counter() - t0
                self.compiled += 1
            t0 = time.perf_counter()
            self.programs[b] = LoadedProgram(path, self.model, b, self.tokens_per_step)
            self.load_seconds += time.perf_counter() - t0
        return self.programs[b]

    @torch.inference_mode()
    def __call__(self, model: Qwen3NextForCausalLM, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        tokens = token.view(-1, self.tokens_per_step)
        if self.failed or not self.ready(tokens.shape[0]):
            return decode_one_token(model, token, cache)
        run = self.program(tokens.shape[0])
        T = tokens.shape[1]
        cache.reserve(T)
        length = torch.tensor(cache.length, device=token.device)
        logits = run(tokens, cache.next_position, length, window_tensor(cache), cache.key_mask, state_tensors(cache))
        cache.length += T
        return logits[:, -1] if T == 1 else logits


def compiler_available(device: torch.device) -> bool:
    """AOTInductor builds C++ on a CPU: a compiler must be at hand."""
    return device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is not None


def choose_decoder(model: Qwen3NextForCausalLM, compile: str, new_tokens: int, batch_size: int = 1,
                   on_compile=None, background: bool = False) -> DecodeFn:
    """The decoding step for --compile yes | no | auto. auto: the compiled step where a C++ compiler is
    at hand and its program is on disk already, or the run is long enough to pay for compiling it
    (`new_tokens` >= COMPILE_MIN_TOKENS); else the eager step, or with `background` (a server) the
    compiled step made in another process while the eager one serves. yes: compile now if needed (with
    `background`, a dense model's program for any batch too; an MoE model's other batch sizes aside). A
    compile that fails is a UserError with yes, a note and the eager step with auto."""
    if compile == "no" or (compile == "auto" and not compiler_available(model.device)):
        return decode_one_token
    if not compiler_available(model.device):
        raise UserError(f"--compile needs a C++ compiler ({os.environ.get('CXX', 'g++')}) on a CPU; "
                        "pass --no-compile")
    decoder = CompiledDecoder(model, on_compile=on_compile, background=background)
    if compile == "yes" or decoder.is_cached(batch_size) or new_tokens >= COMPILE_MIN_TOKENS:
        try:
            decoder.program(batch_size)
            if compile == "yes" and background and decoder.dynamic_batch:
                decoder.program(2)  # a server's batches of several rows
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            message = f"could not compile the decoding step: {type(e).__name__}: {first}"
            if compile == "yes":
                raise UserError(message + " (pass --no-compile)") from None
            if on_compile is not None:
                on_compile(message + "; decoding eagerly")
            return decode_one_token
        return decoder
    return decoder if background else decode_one_token
