"""What is around the method but not the method, kept out of lossagent.py so that it reads as the paper's algorithm:

configurator  TOML files into the config dataclasses and back (include, --set, type checks)
doctor        the files a config needs: `lossagent.py doctor` and `prefetch`, and the checks before stage 0
evaluate      `lossagent.py eval`: the benchmark protocol for a checkpoint or a folder of images
external      experts outside the process: a program, a person
report        history.json, report.md, curves.png
rundir        the run directory's files: atomic writes, JSON-lines logs
"""
