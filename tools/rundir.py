"""The run directory's files: atomic writes, the JSON-lines logs and their truncation on resume."""
import json
import os
from pathlib import Path


def write_atomic(path, write):
    """Writes through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def append_jsonl(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def truncate_logs(paths, last_stage, attempt):
    """On resume, drops the log lines of the interrupted attempt (and anything after it): what stays is what an
    uninterrupted run had written after `last_stage` and before `attempt` of the next stage."""
    def finished(line):
        return line["stage"] <= last_stage or (line["stage"] == last_stage + 1 and line.get("attempt", 0) < attempt)
    for path in paths:
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line and finished(json.loads(line))]
            write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in lines)))
