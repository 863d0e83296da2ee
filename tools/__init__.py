"""What is around the method but not the method, kept out of lossagent.py so that it reads as the paper's algorithm:

configurator  TOML files into the config dataclasses and back (include, --set, types, choices, bounds), the listing
validate      the checks of a config that depend on several settings
doctor        the files a config needs: `lossagent.py doctor` and `prefetch`, and the checks before stage 0
evaluate      `lossagent.py eval`: the benchmark protocol for a checkpoint or a folder of images
llm           the LLM backends: a local transformers model, an OpenAI-compatible server; constrained decoding
external      experts outside the process: a program, a person
runlog        metrics.jsonl, the console lines, TensorBoard and W&B
report        history.json, report.md, curves.png, experience.json, the feedback sheets, memory per phase
rundir        the run directory's files: atomic writes, JSON-lines logs, the lock, the checkpoint to resume from
"""
