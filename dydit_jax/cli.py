"""What every entry point shares: its start (logging, the compilation cache, the
multi-process start), flag parsing, and its end on bad input: one `error:` line, exit code 2.

    def main(argv):
        cli.start(distributed=True)
        try:
            ...
        except (ValueError, FileNotFoundError) as e:
            sys.exit(cli.fail(e))
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys

from absl import flags

from dydit_jax import compile_cache, logs, parallel

BAD_INPUT = 2  # the exit code of every entry point for bad input (argparse's)


def start(*, distributed: bool = False, log_info: bool = True) -> None:
    """An entry point's first steps: our INFO lines with the libraries' kept to warnings, the
    persistent compilation cache, and (`distributed`) the multi-process start that the
    launcher's environment describes (nothing on one process)."""
    if log_info:
        logs.configure()
    compile_cache.enable()
    if distributed:
        parallel.initialize_distributed()


def fail(error: BaseException) -> int:
    """Print `error: ...` (one line for expected bad input) to stderr; returns the exit code."""
    message = f"missing entry {error}" if isinstance(error, KeyError) else str(error)
    print(f"error: {message}", file=sys.stderr)
    return BAD_INPUT


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`, with the errors that
    ml_collections raises for `--config.KEY=VALUE` overrides (an unknown key, a value of the
    wrong type) turned into one line naming the key and the closest valid names."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
        sys.exit(BAD_INPUT)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(fail(ValueError(config_override_message(e, argv, _loaded_config(argv)))))


def _loaded_config(argv: list[str]):
    """The --config file's ConfigDict (for the names in a message), or None."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not paths:
        return None
    path, _, arg = paths[-1].partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_message", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg or None) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - only a hint for the message
        return None


def config_override_message(error: Exception, argv: list[str], config=None) -> str:
    """One line for a failed `--config.` override: which key, and what ml_collections
    suggests (its "Did you mean" names the closest existing keys)."""
    text = " ".join(str(a) for a in error.args) or type(error).__name__
    text = text.replace("\\n", " ").replace("\n", " ").strip("'\" ")
    key = re.match(r"^\\?'?([A-Za-z_][\w]*)\\?'?", text)
    overrides = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
    matching = [o for o in overrides if key and o.split(".")[-1] == key[1]]
    where = matching[0] if matching else (overrides[0] if overrides else "--config")
    hint = re.search(r'Did you mean "?([^"?]+)"? instead', text)
    if hint:
        return (f"--{where}: the config has no such key; did you mean "
                f"{where.rsplit('.', 1)[0]}.{hint[1]}? (see the config file's fields)")
    if isinstance(error, KeyError | AttributeError):
        names = _names_beside(config, where)
        close = difflib.get_close_matches(where.split(".")[-1], names, n=3, cutoff=0.0)
        listed = f"; the closest: {', '.join(close)}" if close else ""
        return f"--{where}: the config has no such key{listed}"
    return f"--{where}: {re.sub(r'[ ]+', ' ', text)}"


def _names_beside(config, where: str) -> list[str]:
    """The keys of the group that `where` (config.a.b) points into."""
    group = config
    for part in where.split(".")[1:-1]:
        try:
            group = group[part]
        except Exception:  # noqa: BLE001
            return []
    try:
        return sorted(group.keys())
    except Exception:  # noqa: BLE001
        return []
