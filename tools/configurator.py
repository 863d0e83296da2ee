"""TOML config files into dataclasses, and back: `include`, `--set`, type checks, and writing the resolved config.

The dataclasses themselves live in lossagent.py, one per TOML section, each field with a one-line comment; this
module knows nothing about them beyond their fields. A field whose type is `list[SomeDataclass]` is an array of
tables (`[[experts]]`). Every mistake a user can make in a file or on the command line raises ConfigError with
one line that names the file, key or value and says what is valid.
"""
import inspect
import io
import json
import sys
import tokenize
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting the user can fix; lossagent.py prints it on one line and exits with status 2."""


def table_type(f):
    """The dataclass of a field that is one table, or of each entry of an array of tables; None for a plain value."""
    if is_dataclass(f.type):
        return f.type
    args = typing.get_args(f.type)
    return args[0] if typing.get_origin(f.type) is list and args and is_dataclass(args[0]) else None


def read_toml(path, seen=()):
    """Reads a TOML file; `include = "base.toml"` (relative to the file) is read first and overridden table by table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path} includes itself (through {' -> '.join(str(p) for p in seen)})")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    base = raw.pop("include", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: include must be a file name, got {base!r}")
    return merge(read_toml(path.parent / base, (*seen, path.resolve())), raw)


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw, assignment, root):
    """`section.key=value` (or experts.<i>.key, model.args.key): the value is read as TOML, else as a string."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got '{assignment}'")
    dotted, text = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    keys = dotted.strip().split(".")
    sections = {f.name: f for f in fields(root)}
    if keys[0] not in sections or len(keys) < 2:
        raise ConfigError(f"--set {dotted}: expected section.key with section one of: {', '.join(sections)}")
    arrays = {name for name, f in sections.items() if typing.get_origin(f.type) is list}
    node = raw
    for k in keys[:-1]:
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {dotted}: '{k}' is not an index of the {len(node)} configured entries")
            node = node[int(k)]
        else:
            node = node.setdefault(k, [{}] if node is raw and k in arrays else {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {dotted}: '{k}' is a value, not a table")
    if isinstance(node, list):  # experts.metric=niqe or experts.0=...: an entry's key is experts.<i>.<key>
        wanted = f"{keys[-2]}.{keys[-1]}.<key>" if keys[-1].isdigit() else f"{keys[-2]}.<i>.{keys[-1]}"
        raise ConfigError(f"--set {dotted}: {keys[-2]} is an array of tables ({len(node)} here): set {wanted}")
    node[keys[-1]] = value


class Bound:
    """A field's bound, read by check_type: `Annotated[int, AtLeast(1)]`, `Annotated[float, Above(0), Below(1)]`."""

    def __init__(self, limit):
        self.limit = limit

    def check(self, value, where):
        if not self.holds(value):
            raise ConfigError(f"{where} = {value!r} must be {self}")


class AtLeast(Bound):
    def holds(self, value):
        return value >= self.limit

    def __str__(self):
        return f"at least {self.limit}"


class Above(Bound):
    def holds(self, value):
        return value > self.limit

    def __str__(self):
        return f"greater than {self.limit}"


class Below(Bound):
    def holds(self, value):
        return value < self.limit

    def __str__(self):
        return f"below {self.limit}"


def check_type(value, kind, where):
    """`value` must be of the field type `kind` (an int is accepted where a float is expected); for `list[X]`
    every element must be an X."""
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin is typing.Annotated:
        value = check_type(value, args[0], where)
        for bound in kind.__metadata__:
            bound.check(value, where)
        return value
    if origin is typing.Literal:
        if value not in args:
            shown = ", ".join(a if a else '""' for a in args)
            raise ConfigError(f"{where} = {value!r} is not one of: {shown}")
        return value
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin in (int, bool):
        ok = isinstance(value, origin) and (origin is bool) == isinstance(value, bool)
    else:
        ok = isinstance(value, origin)
    if not ok:
        raise ConfigError(f"{where} must be {origin.__name__}, got {value!r}")
    if origin is list and args:
        value = [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def build(cls, raw, where):
    """The dataclass `cls` from its TOML table `raw`; nested tables and arrays of tables by their field types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {raw!r}")
    valid = {f.name: f for f in fields(cls)}
    unknown = [k for k in raw if k not in valid]
    if unknown:
        kind = "section" if not where else "key"
        shown = f"[{unknown[0]}]" if not where else f"'{where}.{unknown[0]}'"
        raise ConfigError(f"unknown {kind} {shown}; valid {kind}s{f' of [{where}]' if where else ''}: {', '.join(valid)}")
    values = {}
    for k, v in raw.items():
        inner, name = table_type(valid[k]), f"{where}.{k}" if where else k
        if inner is not None and typing.get_origin(valid[k].type) is list:
            if not isinstance(v, list):
                raise ConfigError(f"{name} must be an array of tables ([[{name}]]), got {v!r}")
            values[k] = [build(inner, t, f"{name}.{i}") for i, t in enumerate(v)]
        elif inner is not None:
            values[k] = build(inner, v, name)
        else:
            values[k] = check_type(v, valid[k].type, name)
    return cls(**values)


def load(root, path, overrides=()):
    """The `root` dataclass from a TOML file and `--set` overrides."""
    raw = read_toml(path)
    for assignment in overrides:
        apply_override(raw, assignment, root)
    return build(root, raw, "")


def comments(cls):
    """The one-line comment after each field of the dataclass `cls` in its source: {field: comment}."""
    found = {}
    tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    for k, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT and k >= 1:
            line = tokens[k - 1].line.strip()
            name = line.split(":", 1)[0].strip()
            if name.isidentifier() and tok.start[0] == tokens[k - 1].start[0]:
                found.setdefault(name, tok.string.lstrip("#").strip())
    return found


def value_text(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {value_text(x)}" for k, x in v.items()) + " }" if v else "{}"
    return "[" + ", ".join(value_text(x) for x in v) + "]"


def to_toml(d, prefix=""):
    """Writes a resolved config (as dicts) back as TOML (scalars first, then sub-tables), so `--config` can rerun it."""
    lines = [f"{k} = {value_text(v)}" for k, v in d.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.")]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += ["", f"[[{prefix}{k}]]", to_toml(item, f"{prefix}{k}.")]
    return "\n".join(lines).strip("\n")


def listing(cfg):
    """The resolved config `cfg` as TOML a user can copy: every section and key with its value, and after it the
    one-line comment of its dataclass field, its default when the value differs, and its choices."""
    def choices(kind):
        return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()

    def table(obj, header):
        notes, defaults, lines = comments(type(obj)), type(obj)(), [header]
        for f in fields(obj):
            value, default = getattr(obj, f.name), getattr(defaults, f.name)
            text = f"{f.name} = {value_text(asdict(value) if is_dataclass(value) else value)}"
            extra = [notes.get(f.name, "")]
            if value != default:
                extra.append(f"default {value_text(default)}")
            if choices(f.type):
                extra.append("one of " + ", ".join(value_text(c) for c in choices(f.type)))
            extra += [str(b) for b in getattr(f.type, "__metadata__", ())]
            lines.append(f"{text}  # " + "; ".join(e for e in extra if e) if any(extra) else text)
        return lines

    out, top = [], comments(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if table_type(f) is not None and typing.get_origin(f.type) is list:
            out += [f"# [[{f.name}]]: {top.get(f.name) or 'an array of tables'}; {len(value)} here"]
            for item in value:
                out += table(item, f"[[{f.name}]]") + [""]
            if not value:  # its keys all the same, commented out: the listing still loads as this config
                out += ["# " + line for line in table(table_type(f)(), f"[[{f.name}]]")] + [""]
        else:
            out += table(value, f"[{f.name}]") + [""]
    return "\n".join(out).rstrip() + "\n"
