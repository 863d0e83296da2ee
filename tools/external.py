"""Experts outside this process: a program (`kind = "command"`) and a person (`kind = "human"`).

Both answer in the same JSON: {"scores": {"<name>.png": number, ...}} or {"texts": {"<name>.png": "...", ...}}.
Anything else, a crash, or a timeout raises ExpertError with the reason, and the stage falls back.
"""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.images import load_image, save_image, to_tensor


class ExpertError(RuntimeError):
    """An expert could not judge this stage: the stage falls back, the run goes on."""


def file_names(feedback):
    """The file each feedback image goes to, <name>.png, in folders that programs and people read."""
    return [f"{Path(item['name']).stem}.png" for item in feedback]


def write_images(folder, restored, feedback, with_gt=True):
    """`folder`/images/<name>.png (restored) and `folder`/gt/<name>.png when there is ground truth."""
    files = file_names(feedback)
    for file, out, item in zip(files, restored, feedback):
        save_image(out, Path(folder) / "images" / file)
        if with_gt and item["gt"] is not None:
            save_image(item["gt"], Path(folder) / "gt" / file)
    return files


def read_answer(text, files, texts, source, stderr=""):
    """The answer for each of `files`, from JSON (text or bytes): descriptions (`texts`) or finite numbers."""
    key = "texts" if texts else "scores"
    try:
        values = json.loads(text)[key]
        answer = [values[f] for f in files]
        if texts:
            ok = all(isinstance(v, str) for v in answer)
        else:
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in answer)
            answer = [float(v) for v in answer] if ok else answer  # a huge integer overflows here
            ok = ok and all(math.isfinite(v) for v in answer)
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
        ok, answer = False, repr(e)
    if not ok:
        raise ExpertError(f"{source} is not JSON of the form {{\"{key}\": {{\"{files[0]}\": ...}}}} with an entry "
                          f"for each of {', '.join(files)}" + (" (finite numbers)" if not texts else "")
                          + f": {text[:200]!r}" + (f"; stderr: ...{stderr[-500:]}" if stderr.strip() else ""))
    return answer


def ask_program(command, timeout, restored, feedback, texts):
    """Runs `command + [FOLDER]` on the restored images written to a temporary FOLDER; its stdout is the answer.
    The program runs in a process group of its own, which ends with it: on a timeout every process of the group
    is killed (a wrapper's children too, which would keep holding their model's memory)."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_images(folder, restored, feedback)
        shown = " ".join(command)
        try:
            process = subprocess.Popen([*command, folder], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise ExpertError(f"cannot start `{shown}`: {e}") from None
        try:
            stdout, stderr = process.communicate(timeout=timeout or None)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
            except (ProcessLookupError, PermissionError):
                pass
        if timed_out:
            stdout, stderr = process.communicate()
        stdout, stderr = (x.decode("utf-8", errors="replace") for x in (stdout, stderr))
        if timed_out:
            raise ExpertError(f"`{shown}` took longer than {timeout:g} s and was stopped; stderr: ...{stderr[-500:]}")
        if process.returncode:
            raise ExpertError(f"`{shown}` exited with status {process.returncode}; stderr: ...{stderr[-500:]}")
        return read_answer(stdout, files, texts, f"the output of `{shown}`", stderr)


def ask_person(name, timeout, restored, feedback, texts, stage, run_dir):
    """A person judges the stage: each image is shown beside the previous stage's (or the degraded input), in
    runs/<name>/human/stage_<i>/, and answers in the terminal or in answer.json there."""
    folder = Path(run_dir) / "human" / f"stage_{stage}"
    files = file_names(feedback)
    for file, out, item in zip(files, restored, feedback):
        previous = Path(run_dir) / "feedback" / f"stage_{stage - 1}" / "images" / file
        if stage > 0 and previous.exists():
            before = to_tensor(load_image(str(previous)))[None]
        else:
            before = torch.nn.functional.interpolate(item["lq"], size=out.shape[-2:], mode="nearest")
        save_image(torch.cat([before, out], dim=-1), folder / file)  # [1, 3, H, 2W]: before | after
    answer = folder / "answer.json"
    key = "texts" if texts else "scores"
    print(f"[{name}] stage {stage}: compare the images in {folder} (left: before, right: after this stage) "
          f"and write {answer} as {{\"{key}\": {{\"{files[0]}\": ..., ...}}}}", flush=True)
    if sys.stdin is not None and sys.stdin.isatty():
        values = {f: input(f"{name} for {f}: ") for f in files}
        if not texts:
            try:
                values = {f: float(v) for f, v in values.items()}
            except ValueError as e:
                raise ExpertError(f"not a number: {e}") from None
        return read_answer(json.dumps({key: values}), files, texts, "the terminal")
    start = time.time()
    while not answer.exists():
        if timeout and time.time() - start > timeout:
            raise ExpertError(f"no answer in {answer} after {timeout:g} s")
        time.sleep(1)
    time.sleep(0.2)  # let a writer finish the file
    return read_answer(answer.read_bytes(), files, texts, str(answer))
