"""Co-Instruct (q-future/co-instruct) as a LossAgent text expert, in a Python environment of its own.

Co-Instruct's model code (trust_remote_code) targets transformers 4.36/4.37 and patches transformers'
Llama classes for the whole process, while pyiqa needs transformers >= 5: the two cannot share a
process. LossAgent runs this script through a `command` expert instead. Once, on a node with internet:

    python3 -m venv experts/coinstruct_env
    experts/coinstruct_env/bin/pip install -r experts/requirements-coinstruct.txt
    experts/coinstruct_env/bin/python experts/coinstruct.py --prefetch

and in the config (configs/air_coinstruct.toml):

    [[experts]]
    kind = "command"
    name = "Co-Instruct"
    command = ["experts/coinstruct_env/bin/python", "experts/coinstruct.py"]
    output = "text"

LossAgent appends a folder holding images/<name>.png; this script prints {"texts": {"<name>.png": description}}
on stdout and nothing else (everything the libraries print goes to stderr).
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

PROMPT = ("USER: The image: <|image|> Describe the quality of this image: its sharpness, noise, artifacts, "
          "colours and overall look. ASSISTANT:")


def load_model(name, device):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, torch_dtype=torch.float16,
                                                attn_implementation="eager", device_map={"": device})


def describe(model, files, prompt, max_new_tokens):
    """One description per image; Co-Instruct's own `chat` takes the prompt with one <|image|> slot."""
    from PIL import Image
    return {p.name: model.chat(prompt, [Image.open(p).convert("RGB")], max_new_tokens=max_new_tokens).strip()
            for p in files}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="folder with images/*.png (given by LossAgent)")
    parser.add_argument("--model", default="q-future/co-instruct", help="Hugging Face id or local directory")
    parser.add_argument("--device", default="cuda:0", help="where the fp16 model runs")
    parser.add_argument("--prompt", default=PROMPT, help="the question, with one <|image|>")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--prefetch", action="store_true", help="download the model into the Hugging Face cache and exit")
    args = parser.parse_args(argv)
    if args.prefetch:
        import huggingface_hub
        print(f"{args.model} -> {huggingface_hub.snapshot_download(args.model)}")
        return 0
    if args.folder is None:
        parser.error("give the image folder (or --prefetch)")
    files = sorted((Path(args.folder) / "images").glob("*.png"))
    if not files:
        print(f"no images in {Path(args.folder) / 'images'}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON answer alone
        texts = describe(load_model(args.model, args.device), files, args.prompt, args.max_new_tokens)
    print(json.dumps({"texts": texts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
