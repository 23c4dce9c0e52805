"""Checkpoints: atomic writes, safe loading, random-generator state and DINO's restart_from_checkpoint."""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.hub
import torch.nn as nn

from cli import ConfigError, key_mismatch, one_line
from runtime import fix_random_seeds, get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process


def write_atomically(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it to ``path``.

    A crash or a kill at any moment leaves either the previous file or the new one, never a truncated mix,
    because ``os.replace`` within one file system is atomic. The temporary file is named after this process;
    those of earlier processes that were killed before their rename (possibly a checkpoint's size each) are
    removed first.
    """
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (:func:`write_atomically`): every result file the scripts
    write goes through here, so a kill never leaves half a file that a later reader would choke on."""
    write_atomically(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp.<pid>`` files beside ``path`` whose process no longer runs (killed mid-write)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save(obj, f))


def save_on_master(obj: Any, path: str | Path) -> None:
    if is_main_process():
        save_checkpoint(obj, path)


def get_rng_state(device: str | torch.device = "cpu") -> dict:
    """All random generators that shape a run (python, numpy, torch's CPU one, and the CUDA generator of
    ``device`` when it is a GPU), for exact resumption.

    Only the run's own GPU's generator: reading every visible GPU's would create a CUDA context on each of
    them in every process, and a resume that sees fewer GPUs (one per task) could not put them back. Held as
    tensors, ints and tuples only (numpy's key array as a tensor), so that a checkpoint carrying it loads with
    plain ``torch.load`` (weights_only) and no allowlist.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: str | torch.device = "cpu") -> None:
    """Put back what :func:`get_rng_state` saved; the CUDA generator goes to ``device`` when it is a GPU.
    Older checkpoints hold a list with every visible GPU's: the one of the device's index is taken."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # older checkpoints: a numpy array
    torch.set_rng_state(state["torch"])
    device = torch.device(device)
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def plain_args(args: argparse.Namespace) -> dict:
    """``vars(args)`` with every value a plain Python value (str, number, bool, None, list, dict), so that a
    checkpoint's ``args`` loads with plain ``torch.load``; anything else (a Path, a device) becomes its str."""

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.generic):
            return value.item()
        return str(value)

    return {key: plain(value) for key, value in vars(args).items()}


def restart_from_checkpoint(ckp_path: str | Path, run_variables: dict | None = None, **kwargs) -> bool:
    """Load the objects in ``kwargs`` (model, optimizer, scaler, loss) from a checkpoint, if it exists.

    DINO's function, made strict: a model whose keys do not match is an error rather than a printed note,
    since resuming into a different architecture silently would waste a run. ``module.`` prefixes
    (checkpoints saved from DDP) are matched either way. Returns whether a checkpoint was found.
    """
    if not os.path.isfile(ckp_path):
        return False
    print(f"Found checkpoint at {ckp_path}")
    checkpoint = load_checkpoint_safely(ckp_path)
    for key, value in kwargs.items():
        if value is None or (key.endswith("scaler") and key not in checkpoint):
            continue  # a gradient scaler starts afresh when the checkpoint's run used none (another precision)
        if key not in checkpoint:
            raise ConfigError(
                f"cannot resume from {ckp_path}: it has no '{key}' entry (not a checkpoint of this script?)"
            )
        state = checkpoint[key]
        if isinstance(value, nn.Module):
            state = _match_module_prefix(state, value.state_dict())
            expected = value.state_dict()
            wrong_shape = [
                f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                for k, v in state.items()
                if k in expected and hasattr(v, "shape") and v.shape != expected[k].shape
            ]
            if set(state) != set(expected) or wrong_shape:
                difference = key_mismatch(expected, state) if set(state) != set(expected) else ""
                if wrong_shape:
                    difference = f"{len(wrong_shape)} of other shapes (first: {wrong_shape[0]})"
                raise ConfigError(
                    f"cannot resume from {ckp_path}: its '{key}' does not fit this model ({difference}); "
                    "use the same --arch, or another --output_dir"
                )
        value.load_state_dict(state)
        print(f"=> loaded '{key}' from checkpoint '{ckp_path}'")
    if run_variables is not None:
        for var_name in run_variables:
            if var_name in checkpoint:
                run_variables[var_name] = checkpoint[var_name]
    return True


def _match_module_prefix(state: dict, target: dict) -> dict:
    """Add or strip DDP's ``module.`` prefix so that ``state`` uses the same key style as ``target``."""
    target_prefixed = next(iter(target), "").startswith("module.")
    state_prefixed = next(iter(state), "").startswith("module.")
    if state_prefixed and not target_prefixed:
        return {k.removeprefix("module."): v for k, v in state.items()}
    if target_prefixed and not state_prefixed:
        return {f"module.{k}": v for k, v in state.items()}
    return state


def _numpy_globals() -> list:
    """What unpickling numpy arrays and scalars needs. DINO-style checkpoints hold both: the published loop
    writes the schedules' numpy floats into the optimizer's ``lr`` / ``weight_decay``.

    These rebuild plain values from bytes and a dtype; they call nothing named by the file, so allowing them
    keeps the guarantee of weights_only loading. Each is allowed under both of numpy's module names: the
    released checkpoints were pickled under numpy 1.x (``numpy.core.multiarray.scalar``), numpy 2 writes
    ``numpy._core.multiarray.scalar``, and the installed numpy knows its builders under one name only.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    builders = [
        (builder, f"{module}.multiarray.{builder.__name__}")
        for builder in (_reconstruct, scalar)
        for module in ("numpy.core", "numpy._core")
    ]
    return [*builders, np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]


# How torch.save's files begin: a zip archive (torch >= 1.6), or a pickle (older, and DINO-era checkpoints).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL = b"\x80"


def load_checkpoint_safely(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers and the few allowlisted classes only.

    Published DINO / DINO-MC checkpoints store ``args`` as an ``argparse.Namespace``, which is allowlisted
    with numpy's array and scalar constructors; anything else a pickle asks for (a function to call, a class
    to build) is refused before it can run, so a downloaded file cannot execute code on load. ``mmap`` leaves
    the tensors on disk until they are used (reading a few small entries of a large checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; expected a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ConfigError(f"cannot read checkpoint {path}: {one_line(err)}") from None
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL)):
        raise ConfigError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
        if unsafe is None:
            raise ConfigError(f"cannot read checkpoint {path}: {one_line(err)}") from None
        raise ConfigError(
            f"refusing to load {path}: it asks for {unsafe.group(1)}, which could run code while unpickling "
            "(only tensors, plain containers, numpy values and argparse.Namespace are accepted)"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as err:  # truncated or corrupt
        raise ConfigError(f"cannot read checkpoint {path} (truncated or corrupt?): {one_line(err)}") from None


def gather_rng_states(device: str) -> list[dict]:
    """Every rank's RNG state (rank order), so that a resumed multi-process run continues each stream."""
    state = get_rng_state(device)
    if not is_dist_avail_and_initialized():
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def resume_iteration(checkpoint: dict, args: argparse.Namespace, niter: int) -> int:
    """The iteration of its epoch a (mid-epoch) checkpoint resumes at. Saved with another total batch (world
    size x --batch_size_per_gpu), it resumes after as many samples of the epoch's global order (which does
    not depend on the world size), rounded down: none is skipped, a few may be seen twice."""
    iteration = checkpoint["iteration"]
    saved = checkpoint["args"]
    saved_batch = saved.get("world_size", args.world_size) * saved.get("batch_size_per_gpu", args.batch_size_per_gpu)
    batch = args.world_size * args.batch_size_per_gpu
    if iteration and saved_batch != batch:
        converted = min(iteration * saved_batch // batch, niter)
        print(f"Checkpoint at iteration {iteration} of batches of {saved_batch}: resuming at {converted} of {batch}.")
        return converted
    return iteration


def restore_rng_state(states: list[dict], seed: int, epoch: int, device: str) -> None:
    """Restore this rank's RNG stream; with a different world size, reseed per rank and epoch instead."""
    if len(states) == get_world_size():
        set_rng_state(states[get_rank()], device)
    else:
        print(
            f"Checkpoint has RNG states for {len(states)} processes, this run has {get_world_size()}: "
            f"reseeding from --seed {seed} and epoch {epoch}."
        )
        fix_random_seeds(seed, epoch)
