"""The checks of a config that depend on several settings (types, choices and bounds of single settings are the
dataclasses' own, checked by tools/configurator.py), so that a bad setting fails before anything is built."""
from losses import check_repository
from tools.configurator import ConfigError


def expert_name(e):
    """What the LLM calls an expert: its `name`, else the pyiqa metric upper-cased, or "Human"."""
    return e.name or (e.metric.upper() if e.kind == "pyiqa" else "Human")


def validate(cfg):
    """Cross-field checks, so that a bad setting fails before anything is built."""
    if len(cfg.losses.names) != len(cfg.losses.weights) or not cfg.losses.names:
        raise ConfigError(f"losses.names {cfg.losses.names} and losses.weights {cfg.losses.weights} "
                          "must be non-empty lists of the same length")
    try:
        check_repository(cfg.losses.names, cfg.losses.options)
    except ValueError as e:
        raise ConfigError(f"losses: {e}") from None
    if not cfg.losses.max_weight > cfg.losses.min_weight:
        raise ConfigError(f"losses.max_weight = {cfg.losses.max_weight} must be greater than losses.min_weight")
    name = cfg.output.name
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"output.name = {name!r} must be a plain folder name (no path separator, not '..'): "
                          "the run folder is output.root/output.name")
    for name, w in zip(cfg.losses.names, cfg.losses.weights):
        if not cfg.losses.min_weight <= w <= cfg.losses.max_weight:
            raise ConfigError(f"initial weight {name} = {w} is outside [losses.min_weight, losses.max_weight]")
    if not any(w > 0 for w in cfg.losses.weights):
        raise ConfigError(f"losses.weights = {cfg.losses.weights}: at least one weight must be above 0, or nothing trains")
    if not cfg.experts:
        raise ConfigError("at least one [[experts]] table is needed: the agent steers towards its score")
    for i, e in enumerate(cfg.experts):
        if e.kind == "pyiqa" and e.output != "score":
            raise ConfigError(f"experts.{i}.output = '{e.output}': a pyiqa metric gives scores")
        if e.kind == "command" and not (e.command and e.name):
            raise ConfigError(f"experts.{i}: a command expert needs `command` (program and arguments) and a `name`")
        if e.kind != "pyiqa" and e.output == "score" and not e.direction:
            raise ConfigError(f"experts.{i}: say whether a lower or higher {e.kind} score is better (direction)")
        if e.range and (len(e.range) != 2 or not e.range[0] < e.range[1]):
            raise ConfigError(f"experts.{i}.range = {e.range} must be [low, high] with low below high")
    if len({expert_name(e) for e in cfg.experts}) != len(cfg.experts):
        raise ConfigError("two experts have the same name: give each a distinct `name`")
    if cfg.agent.backend in ("transformers", "openai") and not cfg.agent.model:
        raise ConfigError(f"agent.model is empty: name the LLM for the {cfg.agent.backend} backend")
    d, scale = cfg.data, cfg.task.scale
    if cfg.task.name == "risr" and (d.patch_size % scale or d.degrade_size and (d.degrade_size < d.patch_size
                                                                                 or d.degrade_size % scale)):
        raise ConfigError(f"data.patch_size = {d.patch_size} and data.degrade_size = {d.degrade_size} must be multiples "
                          f"of task.scale = {scale}, and the degraded crop at least as large as the patch")
    if cfg.agent.backend.startswith("optuna") and not any(e.kind == "pyiqa" or e.output == "score" for e in cfg.experts):
        raise ConfigError(f"agent.backend = '{cfg.agent.backend}' needs a score expert: an optimizer cannot read text")
    if cfg.reflection.enabled and cfg.agent.backend == "fixed":
        raise ConfigError("reflection with agent.backend = 'fixed' would train the undone stage again bit for bit "
                          "(same weights, data and random numbers): use another backend or switch reflection off")
