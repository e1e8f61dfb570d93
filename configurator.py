"""
Strict nanoGPT-style configurator. A training script defines every setting as a plain global
and then runs

    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

(found next to the script, so it runs from any directory), which applies the command line to
those globals, left to right:

    python train_baseline.py config/arith.py --batch_size=32 --learning_rate=1e-4

- `config/arith.py` (no '=' and no leading '-'): a Python file exec'd with the current
  settings in scope. It may only assign existing settings; helper names must start with '_'
  (imports and functions are ignored).
- `--key=value`: split on the first '=' (so `--s3_uri=s3://b/p?x=1` works); the value is
  parsed with ast.literal_eval, falling back to the raw string.
- `--help`: print the settings, their defaults, types and the comments the script gives them, exit 0.

Every setting has a type: the type of its default, or its annotation in the script, which a
setting that defaults to None must have (`max_iters: int | None = None`; an annotation also
lets a non-None default take None: `top_k: int | None = 200`). Annotations are read from the
script's source (the same on every Python 3 version; only builtin type names and None, joined
by `|`). A None default without one is an error.

Type rules (nanoGPT's gaps fixed): only a type that includes None takes None; an int is
accepted (and converted) for a float; a bool takes only True/False (`--compile=1` is an
error); a str keeps the raw text (`--out_dir=123` is the string '123'); list and tuple accept
each other.

An unknown key, a wrong type, a missing or failing config file: one line on stderr
(`train_x.py: error: ...`) and exit code 2, before any work starts. "Overriding: ..." lines
are printed only on rank 0 (RANK unset or "0"). Nothing defined here is left in the script's
globals. Tests and other entry points use `from configurator import apply_overrides`.
"""


class ConfigError(Exception):
    """A bad command line or config file; the message is one line."""


def apply_overrides(config, argv, verbose=False, types=None, comments=None):
    """
    Apply argv (config files and --key=value, in order) to a copy of `config` ({name: default})
    and return it. types: {name: tuple of allowed types} for annotated settings (others take
    their default's type). Raises ConfigError on any problem; `--help` prints the settings (with
    `comments`, {name: text}, beside them) and exits 0.
    """
    import sys
    types = {k: tuple(types[k]) if k in (types or {}) else (type(v),) for k, v in config.items()}
    untyped = sorted(k for k, t in types.items() if t == (type(None),))
    if untyped:
        raise ConfigError(f"setting {untyped[0]!r} defaults to None but has no type: annotate it in the "
                          f"script, e.g. `{untyped[0]}: int | None = None`")
    config = dict(config)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("settings (override with --key=value or a config file):")
            for key in sorted(config):
                comment = (comments or {}).get(key)
                print(f"  --{key}={config[key]!r}  ({_type_names(types[key])})" + (f"  {comment}" if comment else ""))
            sys.exit(0)
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            key, raw = arg[2:].split("=", 1)
            if key not in types:
                raise ConfigError(_unknown_key(key, types))
            value = _check_type(f"--{key}", types[key], _parse_value(raw, types[key]), repr(raw))
            if verbose:
                print(f"Overriding: {key} = {value!r}")
            config[key] = value
        elif "=" in arg or arg.startswith("-"):
            raise ConfigError(f"expected a config file or --key=value, got {arg!r}")
        else:
            for key, value in _run_config_file(arg, config, types).items():
                if verbose:
                    print(f"Overriding from {arg}: {key} = {value!r}")
                config[key] = value
    return config


def declared_types(path):
    """{name: tuple of types} of the module-level annotated assignments in the script at `path`
    (also those inside a top-level `if __name__ == "__main__":`). Read from the source, so
    Python 3.14's lazily evaluated annotations change nothing."""
    import ast
    names = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "tuple": tuple, "dict": dict}

    def flatten(node):  # int | None -> [int, NoneType]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return flatten(node.left) + flatten(node.right)
        if isinstance(node, ast.Constant) and node.value is None:
            return [type(None)]
        if isinstance(node, ast.Name) and node.id in names:
            return [names[node.id]]
        raise ConfigError(f"{path}:{node.lineno}: unsupported setting annotation {ast.unparse(node)!r} "
                          f"(use builtin types and None joined by |, e.g. int | None)")

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    types, body = {}, list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If):
            body[:0] = node.body + node.orelse
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            types[node.target.id] = tuple(flatten(node.annotation))
    return types


def declared_comments(path):
    """{name: its comment} for the settings of the script at `path`: the comment after a module-level
    assignment (also inside `if __name__ == "__main__":`), plus the comment lines right below it
    that continue it (`#   ...`). What --help shows beside each setting."""
    import ast
    import io
    import tokenize
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out, body = {}, list(ast.parse(source, path).body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If):
            body[:0] = node.body + node.orelse
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if len(targets) != 1 or not isinstance(targets[0], ast.Name) or node.end_lineno not in comments:
            continue
        text, line = [comments[node.end_lineno]], node.end_lineno + 1
        while line <= len(lines) and lines[line - 1].strip().startswith("#   "):
            text.append(comments[line])
            line += 1
        out[targets[0].id] = " ".join(text)
    return out


def _type_names(types):
    return " | ".join("None" if t is type(None) else t.__name__ for t in types)


def _unknown_key(key, config, where=""):
    return f"unknown config key {key!r}{where} (known: {', '.join(sorted(config))})"


def _parse_value(raw, types):
    """literal_eval, else the raw string; a str setting keeps the raw text unless it parses to a str
    (or to None where None is allowed)."""
    import ast
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    if str in types and not isinstance(value, str) and not (value is None and type(None) in types):
        value = raw
    return value


def _check_type(label, types, value, shown):
    """Return value (int -> float for a float, list <-> tuple) if one of `types` takes it, else raise ConfigError."""
    for t in types:
        if t is type(None):
            ok = value is None
        elif t is bool:
            ok = isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t in (list, tuple):
            ok = isinstance(value, (list, tuple))
        else:
            ok = isinstance(value, t)
        if ok:
            return t(value) if t in (float, list, tuple) else value
    raise ConfigError(f"{label} expects {' or '.join('None' if t is type(None) else t.__name__ for t in types)}, "
                      f"got {shown}")


def _run_config_file(path, config, types):
    """Exec a config file with the current settings in scope; return {key: checked value} it assigned."""
    import builtins
    import os
    import types as pytypes
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    ns = dict(config)
    ns.update(__file__=path, __name__="__config__")
    try:
        with open(path) as f:  # builtins.*: this code runs in the script's globals, where `compile` is a setting
            builtins.exec(builtins.compile(f.read(), path, "exec"), ns)
    except Exception as e:
        raise ConfigError(f"config file {path!r} failed: {type(e).__name__}: {e}")
    assigned = {}
    for key, value in ns.items():
        if key.startswith("_") or isinstance(value, pytypes.ModuleType) or callable(value):
            continue
        if key not in types:
            raise ConfigError(_unknown_key(key, types, where=f" in {path!r}"))
        if value is not config[key]:
            assigned[key] = _check_type(f"{key} in {path!r}", types[key], value, repr(value))
    return assigned


if __name__ != "configurator":  # exec'd by a training script: override its globals
    def _configure(g):
        import os
        import sys
        kinds = (bool, int, float, str, type(None), list, tuple, dict)
        config = {k: v for k, v in g.items()  # settings: lower-case globals (not _private, not CONSTANTS)
                  if not k.startswith("_") and not k.isupper() and isinstance(v, kinds)}
        try:
            script = g.get("__file__")
            readable = script and os.path.isfile(script)
            types = declared_types(script) if readable else {}
            comments = declared_comments(script) if readable and {"-h", "--help"} & set(sys.argv[1:]) else {}
            g.update(apply_overrides(config, sys.argv[1:], verbose=os.environ.get("RANK", "0") == "0",
                                     types={k: t for k, t in types.items() if k in config}, comments=comments))
        except ConfigError as e:  # data.format.fail's format; this file stays standalone (no repo imports)
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "configurator"
            print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
            sys.exit(2)
    _configure(globals())
    del _configure, ConfigError, apply_overrides, declared_types, declared_comments, _type_names, _unknown_key
    del _parse_value
    del _check_type, _run_config_file
