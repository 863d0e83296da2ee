"""The run directory's files: atomic writes, the JSON-lines logs and their truncation on resume, the lock that
keeps one run per folder, the checkpoint to resume from, and the settings a rerun may change."""
import fcntl
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tools.configurator import ConfigError


def write_atomic(path, write):
    """Writes through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def finite(value):
    """`value` with every non-finite float (the PSNR of identical images is inf) as None, so JSON files stay JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path, value):
    write_atomic(path, lambda p: p.write_text(json.dumps(finite(value), indent=1, allow_nan=False)))


def append_jsonl(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def truncate_logs(paths, last_stage, attempt):
    """On resume, drops the log lines of the interrupted attempt (and anything after it): what stays is what an
    uninterrupted run had written after `last_stage` and before `attempt` of the next stage."""
    def finished(line):
        try:
            record = json.loads(line)
        except ValueError:  # a last line torn by the kill: it belongs to the interrupted attempt
            return False
        return record["stage"] <= last_stage or (record["stage"] == last_stage + 1 and record.get("attempt", 0) < attempt)
    for path in paths:
        if path.exists():
            lines = [line for line in path.read_text(errors="replace").splitlines() if line and finished(line)]
            write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in lines)))


# The settings a rerun may change: they change where or how fast a run goes, or how it is evaluated, never what it
# computes. A rerun that changes any other setting is refused, so that two experiments never mix in one history.
# train.stages may grow (the run is extended: the controller is asked for the new stage's weights).
MAY_CHANGE = ("train.stages", "train.log_every", "train.num_workers", "train.offload", "agent.base_url", "agent.api_key",
              "agent.timeout", "agent.retries", "agent.concurrency", "output", "eval", "benchmarks")


def changed_settings(saved, current, defaults):
    """The settings (section.key; arrays of tables as a whole) in which `current` differs from `saved`, all three
    resolved configs as dicts, leaving out MAY_CHANGE. A key `saved` lacks (a setting added since the run began) is
    compared with its default, the value the run had without knowing it."""
    changed = []
    for section, table in current.items():
        items = table.items() if isinstance(table, dict) else [(None, table)]
        for key, value in items:
            where = section if key is None else f"{section}.{key}"
            if key is None:
                old = saved.get(section, defaults[section])
            else:
                old = saved.get(section, {}).get(key, defaults[section][key])
            if old != value and not any(where == m or where.startswith(m + ".") for m in MAY_CHANGE):
                changed.append(where)
    return changed


def rng_state(device):
    """This process's random streams: torch's (and the GPU's), numpy's and Python's."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
            "python": random.getstate()}


def set_rng_state(rng, device):
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    np.random.set_state(tuple(rng["numpy"]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))


def lock(run_dir):
    """Holds a lock on the run folder (made, with its ckpt/, when new) for the life of the returned file: a second run
    into the same folder fails at once, naming who holds it. The kernel drops the lock when its process ends, however
    it ends, so a lock left by a dead run is taken over. A POSIX record lock (lockf), not flock: it belongs to this
    process alone, so DataLoader workers forked from it, which may outlive a killed run by seconds, do not hold it."""
    (Path(run_dir) / "ckpt").mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / "lock"
    handle = open(path, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{run_dir} is in use by {holder} ({path}): wait for that run to end, "
                          "or give this one another output.name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                 f"({' '.join(sys.argv[:3])})\n")
    handle.flush()
    return handle


def read_checkpoint(ckpt_dir, device):
    """(path, checkpoint) to resume from: ckpt/last.pt, or when it cannot be read (a full disk, a killed copy) the
    newest intact ckpt/stage_<i>.pt, which holds the same (a copy of last.pt at the end of stage i); the damaged file
    is then kept as last.pt.corrupt and a line on stderr says so. (None, None) for a new run. Rank 0 calls it."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    if not last.exists():
        return None, None
    try:
        return last, torch.load(last, map_location=device, weights_only=True)
    except Exception as e:  # torch reports a damaged file in many ways (RuntimeError, EOFError, pickle, zip errors)
        problem = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    stages = sorted((p for p in ckpt_dir.glob("stage_*.pt") if re.fullmatch(r"stage_\d+", p.stem)),
                    key=lambda p: int(p.stem[len("stage_"):]))
    for path in reversed(stages):
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
        except Exception:
            continue
        os.replace(last, ckpt_dir / "last.pt.corrupt")
        print(f"warning: {last} cannot be read ({problem}); resuming from {path}, the newest intact checkpoint "
              f"(stage {ckpt['stage']}); the damaged file is kept as last.pt.corrupt", file=sys.stderr, flush=True)
        return path, ckpt
    raise ConfigError(f"{last} cannot be read ({problem}) and no intact {ckpt_dir}/stage_<i>.pt is there to resume "
                      f"from: remove {ckpt_dir.parent} to start the run again")


def keep_stage(ckpt_dir, stage):
    """ckpt/stage_<stage>.pt: a copy of last.pt once a stage is decided."""
    write_atomic(Path(ckpt_dir) / f"stage_{stage}.pt", lambda p: shutil.copyfile(Path(ckpt_dir) / "last.pt", p))


def attempt_folder(entry):
    """Where an attempt's feedback images (and a person's answers) are: stage_<i>/ for the attempt a stage ends with,
    stage_<i>_attempt_<a>/ for one that was undone."""
    return f"stage_{entry['stage']}_attempt_{entry['attempt']}" if entry.get("rolled_back") else f"stage_{entry['stage']}"


def set_aside(run_dir, stage, attempt, ended):
    """After reflection undid `attempt` of `stage`: its feedback/ and human/ folders move to stage_<i>_attempt_<a>/, and
    when an earlier attempt (`ended`) is the one kept, that attempt's folders come back to stage_<i>/."""
    for part in ("feedback", "human"):
        current = Path(run_dir) / part / f"stage_{stage}"
        moves = [(current, current.with_name(f"stage_{stage}_attempt_{attempt}"))]
        if ended != attempt:
            moves.append((current.with_name(f"stage_{stage}_attempt_{ended}"), current))
        for source, target in moves:
            if source.exists():
                shutil.rmtree(target, ignore_errors=True)  # left by a run killed after this move
                os.replace(source, target)

