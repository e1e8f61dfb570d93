"""
Strict nanoGPT-style configurator. A training script defines every setting as a plain global
and then runs

    exec(open('configurator.py').read())

which applies the command line to those globals, left to right:

    python train_baseline.py config/arith.py --batch_size=32 --learning_rate=1e-4

- `config/arith.py` (no '=' and no leading '-'): a Python file exec'd with the current
  settings in scope. It may only assign existing settings; helper names must start with '_'
  (imports and functions are ignored).
- `--key=value`: split on the first '=' (so `--s3_uri=s3://b/p?x=1` works); the value is
  parsed with ast.literal_eval, falling back to the raw string.
- `--help`: print the settings and their defaults, exit 0.

Type rules (nanoGPT's gaps fixed): a None default takes any value; only a None default takes
None; an int is accepted (and converted) for a float default; a bool default takes only
True/False (`--compile=1` is an error); a str default keeps the raw text (`--out_dir=123` is
the string '123'); list and tuple accept each other; anything else must match the default's type.

An unknown key, a wrong type, a missing or failing config file: one line on stderr
(`train_x.py: error: ...`) and exit code 2, before any work starts. "Overriding: ..." lines
are printed only on rank 0 (RANK unset or "0"). Nothing defined here is left in the script's
globals. Tests and other entry points use `from configurator import apply_overrides`.
"""


class ConfigError(Exception):
    """A bad command line or config file; the message is one line."""


def apply_overrides(config, argv, verbose=False):
    """
    Apply argv (config files and --key=value, in order) to a copy of `config` ({name: default})
    and return it. Raises ConfigError on any problem; `--help` prints the settings and exits 0.
    """
    import sys
    defaults, config = config, dict(config)   # types are checked against the script's defaults
    for arg in argv:
        if arg in ("-h", "--help"):
            print("settings (override with --key=value or a config file):")
            for key in sorted(defaults):
                print(f"  --{key}={defaults[key]!r}")
            sys.exit(0)
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise ConfigError(_unknown_key(key, defaults))
            value = _check_type(f"--{key}", defaults[key], _parse_value(raw, defaults[key]), repr(raw))
            if verbose:
                print(f"Overriding: {key} = {value!r}")
            config[key] = value
        elif "=" in arg or arg.startswith("-"):
            raise ConfigError(f"expected a config file or --key=value, got {arg!r}")
        else:
            for key, value in _run_config_file(arg, config, defaults).items():
                if verbose:
                    print(f"Overriding from {arg}: {key} = {value!r}")
                config[key] = value
    return config


def _unknown_key(key, config, where=""):
    return f"unknown config key {key!r}{where} (known: {', '.join(sorted(config))})"


def _parse_value(raw, default):
    """literal_eval, else the raw string; a str default keeps the raw text unless it parses to a str."""
    import ast
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    if isinstance(default, str) and not isinstance(value, str):
        value = raw
    return value


def _check_type(label, default, value, shown):
    """Return value (int -> float for a float default, list <-> tuple) or raise ConfigError."""
    if default is None:
        return value
    if value is None:
        ok = False
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, float)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok:
            value = type(default)(value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{label} expects {type(default).__name__}, got {shown}")
    return value


def _run_config_file(path, config, defaults):
    """Exec a config file with the current settings in scope; return {key: checked value} it assigned."""
    import builtins
    import os
    import types
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
        if key.startswith("_") or isinstance(value, types.ModuleType) or callable(value):
            continue
        if key not in defaults:
            raise ConfigError(_unknown_key(key, defaults, where=f" in {path!r}"))
        if value is not config[key]:
            assigned[key] = _check_type(f"{key} in {path!r}", defaults[key], value, repr(value))
    return assigned


if __name__ != "configurator":  # exec'd by a training script: override its globals
    def _configure(g):
        import os
        import sys
        kinds = (bool, int, float, str, type(None), list, tuple, dict)
        config = {k: v for k, v in g.items() if not k.startswith("_") and isinstance(v, kinds)}
        try:
            g.update(apply_overrides(config, sys.argv[1:], verbose=os.environ.get("RANK", "0") == "0"))
        except ConfigError as e:  # data.format.fail's format; this file stays standalone (no repo imports)
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "configurator"
            print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
            sys.exit(2)
    _configure(globals())
    del _configure, ConfigError, apply_overrides, _unknown_key, _parse_value, _check_type, _run_config_file
