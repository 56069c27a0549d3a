"""
Configuration for every script, nanoGPT style but checked: defaults are a script's plain globals,
then a config file (`python train.py config/finetune_lora.py`), then the environment variables that
users already know (USE_LORA=True, LORA_RANK=...), then `--key=value` overrides.

    config = configure(defaults, sys.argv[1:])   # a dict with the same keys as `defaults`

An unknown key, a value of the wrong type or a missing config file raises ConfigError with a
one-line message. An int may stand for a float (`--dropout=0`), never the other way round.
"""

import ast
import os
import re
import sys

# environment variable -> config key. USE_LORA=True selects the adapter; TEST_MODE=True asks the
# script for a tiny fast run (each script decides what that shrinks).
ENV_KEYS = {
    "LORA_RANK": "lora_rank",
    "LORA_ALPHA": "lora_alpha",
    "LORA_DROPOUT": "lora_dropout",
    "TEST_MODE": "test_mode",
}
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's modes


# what to do about a path that cannot be used (cli's line for an OSError naming a file)
OS_FIXES = {
    "FileNotFoundError": "check the path (a key or config file names it), or create what it names first",
    "IsADirectoryError": "a folder stands where a file is expected: name the file inside it",
    "NotADirectoryError": "a file stands where a folder is expected: choose another path",
    "PermissionError": "this user may not use it: change its permissions, or choose a path you own",
    "FileExistsError": "something already stands there: move it away, or choose another path",
}


class ConfigError(ValueError):
    """A bad key, value or config file; the message names it and says the fix."""


def _typed(key, value, default, source):
    """Check `value` (already a Python object) against the type of the default."""
    want = type(default)
    if default is None or isinstance(value, want) and not (isinstance(value, bool) and want is not bool):
        return value
    if want is float and type(value) is int:
        return float(value)
    raise ConfigError(f"{source}: {key} must be {want.__name__} (like {default!r}), got {value!r}")


def _parse(text, default=None):
    """A command-line or environment string as a Python literal; anything else is a plain string.
    A string key keeps the text as it is (a prompt of '42' stays '42'); a bool key takes 1/0/true/false."""
    if isinstance(default, bool) and text.lower() in ("1", "0", "true", "false"):
        return text.lower() in ("1", "true")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return text if isinstance(default, str) and not isinstance(value, str) else value


def config_defaults(names):
    """A script's config keys: its globals holding an int, float, bool or str, but not CONSTANTS."""
    return {
        k: v
        for k, v in names.items()
        if not k.isupper() and not k.startswith("_") and isinstance(v, (int, float, bool, str))
    }


def import_plugins(argv):
    """The modules --plugins=a,b names (module names found from the working directory, or paths to .py
    files), imported before any key is read: a module that calls adapters.register adds its family and
    the family's keys to every script. One line for a module that cannot be found."""
    import importlib
    import importlib.util

    given = [a.partition("=")[2] for a in argv if a.startswith("--plugins=")]
    for name in (n.strip() for n in (given[-1] if given else "").split(",") if n.strip()):
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise ConfigError(f"--plugins: no file {name!r}; give the path of your module's .py file")
            module = os.path.splitext(os.path.basename(name))[0]
            if module not in sys.modules:
                spec = importlib.util.spec_from_file_location(module, name)
                sys.modules[module] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(sys.modules[module])
            continue
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"--plugins: no module {name!r} in the working directory or on sys.path; put {name}.py here "
                "or pass its path (--plugins=path/to/it.py)"
            )
        importlib.import_module(name)


def configure(defaults, argv, environ=None, test_overrides=None, described=None, given=None):
    """defaults <- config files in argv <- environment <- --key=value in argv. With TEST_MODE=True (or
    test_mode=True anywhere) `test_overrides` apply just before the --key=value overrides.
    described: {key: (section, help)} for keys that are not the script's own globals (the adapter
    families' keys), for --help. given: a dict to fill with {key: where it was set} for the keys a
    config file, the environment or the command line set (a user's choice, not a default)."""
    if "--help" in argv or "-h" in argv:
        caller = sys._getframe(1).f_globals  # the script whose globals are `defaults`
        env = environ != {} and any(k in defaults for k in ("adapter", *ENV_KEYS.values()))
        print(help_text(caller.get("__file__", "script.py"), caller.get("__doc__"), defaults, env, described))
        raise SystemExit(0)
    if "plugins" in defaults:
        import_plugins(argv)
    config = dict(defaults)
    environ = os.environ if environ is None else environ
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")  # split on the first '=' only
            if not eq:
                raise ConfigError(f"argument {arg!r}: write --{key}=VALUE")
            if key not in config:
                raise ConfigError(f"unknown config key {key!r} in {arg!r}; {_suggest(key, config)}")
            overrides[key] = _typed(key, _parse(text, defaults[key]), defaults[key], f"--{key}")
        elif "=" in arg:
            raise ConfigError(f"argument {arg!r}: overrides are written --key=value")
        else:
            from_file = _read_config_file(arg, defaults)
            if "plugins" in from_file:
                raise ConfigError(
                    f"{arg}: plugins is read before config files: pass --plugins={from_file['plugins']} on the "
                    "command line"
                )
            config.update(from_file)
            if given is not None:
                given.update(dict.fromkeys(from_file, arg))

    use_lora = _typed(
        "USE_LORA", _parse(environ.get("USE_LORA", "False"), False), False, "environment variable"
    )
    if use_lora and "adapter" in config:
        config["adapter"] = "lora"
        if given is not None:
            given["adapter"] = "USE_LORA"
    for var, key in ENV_KEYS.items():
        if var in environ and key in config:
            config[key] = _typed(
                key, _parse(environ[var], defaults[key]), defaults[key], f"environment variable {var}"
            )
            if given is not None:
                given[key] = var
    if overrides.get("test_mode", config.get("test_mode")):
        config.update(test_overrides or {})
    config.update(overrides)
    if given is not None:
        given.update(dict.fromkeys(overrides, "command line"))
    return config


def _suggest(key, known):
    """'did you mean ...?' for a mistyped key (the closest known ones), and where the list is."""
    import difflib

    close = difflib.get_close_matches(key, known, n=2, cutoff=0.75)
    mean = f"did you mean {' or '.join(repr(k) for k in close)}? " if close else ""
    return f"{mean}(--help lists every key)"


def _read_config_file(path, defaults):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (configs live in config/)")
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)
    values = {}
    for key, value in scope.items():
        if key.startswith("_") or type(value).__name__ == "module":
            continue
        if key not in defaults:
            raise ConfigError(f"{path}: unknown config key {key!r}; {_suggest(key, defaults)}")
        values[key] = _typed(key, value, defaults[key], path)
    return values


def help_text(path, doc, defaults, env=True, described=None):
    """--help: the script's docstring, then every config key with its default and the comment beside
    it in the script's source, so the list is the configurator's own and cannot drift."""
    comments, section = {}, {}
    current = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# ") and not line.startswith("# ---"):
                current = line[2:].strip()
            m = re.match(r"^(\w+) = .*?(?:  # (.*))?$", line.rstrip("\n"))
            if m and m.group(1) in defaults and m.group(1) not in comments:
                comments[m.group(1)], section[m.group(1)] = (m.group(2) or "").strip(), current
    for key, (where, text) in (described or {}).items():
        section[key], comments[key] = where, text
    name = os.path.basename(path)
    lines = [
        f"usage: python {name} [config/FILE.py ...] [--key=value ...]   (also: torchrun ... {name} ...)",
        "",
    ]
    lines += [
        (doc or "").strip(),
        "",
        "keys (default), in the order of the script; a config file or --key=value sets them:",
    ]
    shown = None
    for key, value in defaults.items():
        if section.get(key) and section[key] != shown:
            shown = section[key]
            lines.append(f"  # {shown}")
        lines.append(
            f"  --{key}={value!r}".ljust(44) + (f" {comments.get(key, '')}" if comments.get(key) else "")
        )
    if env:
        lines.append(
            "environment: USE_LORA=True (adapter='lora'), LORA_RANK, LORA_ALPHA, LORA_DROPOUT, TEST_MODE=True"
        )
    return "\n".join(lines)


def check_ranges(c, ranges):
    """ranges: {key: "(0, inf)" | "[0, 1)" | ...}: every value finite (unless a bound is inf) and
    inside its interval, else one ConfigError naming the key, the interval and the value."""
    import math

    for key, interval in ranges.items():
        lo_text, hi_text = (t.strip() for t in interval[1:-1].split(","))
        lo, hi, v = float(lo_text), float(hi_text), c[key]
        inside = (v > lo if interval[0] == "(" else v >= lo) and (v < hi if interval[-1] == ")" else v <= hi)
        if math.isnan(v) or math.isinf(v) or not inside:
            raise ConfigError(f"{key} must be in {interval}, got {v!r}")


def check_folder(path, key):
    """A folder the run may create: refused in one line when a file stands at it or above it."""
    where = os.path.abspath(path)
    while where and not os.path.exists(where):
        where = os.path.dirname(where)
    if os.path.exists(where) and not os.path.isdir(where):
        raise ConfigError(f"{key} {path!r} cannot be a folder: {where!r} is a file; choose another --{key}")


def check_device(device):
    """One line for a device this machine or this torch build cannot use."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device={device} but torch sees no CUDA GPU here (torch {torch.__version__}): use "
                "--device=cpu, or install the CUDA build of torch on a GPU machine"
            )
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(
                f"--device={device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device={device} but MPS is not available here: use --device=cpu")
        return
    raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")


def cli(main, argv):
    """Run a script's main(argv) as a command: a user mistake (the repo's errors, a file that cannot
    be read or written, a failed download) ends in one line and exit status 1, printed once under
    torchrun (by rank 0). LOWRANK_DEBUG=1 shows the traceback instead."""
    if os.environ.get("LOWRANK_DEBUG", "0") not in ("", "0"):
        return main(argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        raise SystemExit(
            "error: interrupted (Ctrl-C); files are written whole, so a training run continues from its "
            "last checkpoint with --init_from=resume"
            if int(os.environ.get("RANK", 0)) == 0
            else 1
        ) from None
    except (ValueError, OSError, RuntimeError) as e:  # the repo's errors subclass these three
        own = type(e).__module__ in (
            "__main__",
            "configurator",
            "adapters",
            "checkpoint",
            "train",
            "prepare",
            "eval_bounds",
            "hf",
            "model",
            "files",
            "plots",
        )
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = (
            f"error: {text}"
            if own
            else f"error: {type(e).__name__}: {text} (LOWRANK_DEBUG=1 shows the traceback)"
        )
        fix = OS_FIXES.get(type(e).__name__) if not own and getattr(e, "filename", None) else None
        if fix:  # a path the user gave: what is wrong with it, and what to do
            message = f"error: {e.filename}: {e.strerror}: {fix}"
        raise SystemExit(message if int(os.environ.get("RANK", 0)) == 0 else 1) from None
