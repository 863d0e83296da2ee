"""A command expert for the tests: `expert_program.py MODE FOLDER`.

score: the mean brightness of each restored image in FOLDER/images (as {"scores": {file: value}})
text: a description of each image that names its brightness
sequence STATE v0,v1,...: the k-th call scores every image v_k (STATE counts the calls), to script a worsening
sleep / fail / garbage: misbehaves (too slow, exit status 3, stdout that is not JSON)
huge / nan / bytes / wrongfiles: a malformed answer (a 400-digit integer, NaN, bytes that are not UTF-8, other file
  names), with a line on stderr
spawn PIDFILE: starts a child that would sleep for a minute (its pid in PIDFILE), and sleeps itself
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

mode, folder = sys.argv[1], Path(sys.argv[-1])
files = sorted(p.name for p in (folder / "images").glob("*.png"))
brightness = {f: float(np.asarray(Image.open(folder / "images" / f)).mean() / 255) for f in files}
if mode == "score":
    print(json.dumps({"scores": brightness}))
elif mode == "sequence":
    state, values = Path(sys.argv[2]), [float(v) for v in sys.argv[3].split(",")]
    call = int(state.read_text()) if state.exists() else 0
    state.write_text(str(call + 1))
    print(json.dumps({"scores": {f: values[min(call, len(values) - 1)] for f in files}}))
elif mode == "text":
    print(json.dumps({"texts": {f: f"The image is {'bright' if b > 0.4 else 'dark'}, slightly blurry ({b:.2f})."
                                for f, b in brightness.items()}}))
elif mode == "sleep":
    time.sleep(60)
elif mode == "fail":
    print("the model file is missing", file=sys.stderr)
    sys.exit(3)
elif mode in ("huge", "nan", "bytes", "wrongfiles"):
    print(f"answering {mode}", file=sys.stderr)
    if mode == "bytes":
        sys.stdout.buffer.write(b'{"scores": {"\xff\xfe": 1}}')
    else:
        value = {"huge": "1" + "0" * 400, "nan": "NaN", "wrongfiles": "0.5"}[mode]
        names = [f"other_{f}" for f in files] if mode == "wrongfiles" else files
        print('{"scores": {' + ", ".join(f'"{f}": {value}' for f in names) + "}}")
elif mode == "spawn":
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(sys.argv[2]).write_text(str(child.pid))
    time.sleep(60)
else:
    print("Traceback? no: just not JSON")
