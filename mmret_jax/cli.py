"""One error style for every command-line tool of the package.

A user mistake (a missing file, a bad flag value, an output that already exists, a checkpoint with
the wrong shapes) ends the program with one line on stderr, `error: <what and how to fix>`, and a
non-zero exit status. The traceback is printed only with `MMRET_DEBUG=1` in the environment.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
      sys.exit(cli.run(main))

Argument parsers built with `cli.ArgumentParser` report usage errors the same way (exit status 2),
and `--help` shows every option's default.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Callable, Iterable, Sequence

DEBUG_ENV = "MMRET_DEBUG"
EXIT_ERROR = 1
EXIT_USAGE = 2
# A run stopped by SIGTERM / SIGINT after saving a checkpoint: rerun the same command to resume
# (sysexits.h EX_TEMPFAIL, "try again later"). launch/slurm_gpu.sh requeues the job on it.
EXIT_INTERRUPTED = 75
EXIT_SIGINT = 130

_MAX_MESSAGE = 600


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: str, limit: int = _MAX_MESSAGE) -> str:
  """`message` on one line: lines joined with "; ", a dumped TensorStore spec and its source
  locations cut off, at most `limit` characters."""
  message = str(message).split("See full TensorStore details", 1)[0]  # a whole spec dump follows
  message = re.sub(r"\s*\[(source locations|tensorstore_spec)=[^\]]*\]", "", message)
  parts = [p.strip() for p in message.splitlines() if p.strip()]
  text = "; ".join(parts)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def root_cause(exc: BaseException) -> BaseException:
  """The innermost exception of `exc`'s cause / context chain (the library's own reason)."""
  seen = set()
  while id(exc) not in seen:
    seen.add(id(exc))
    nxt = exc.__cause__ or exc.__context__
    if nxt is None:
      break
    exc = nxt
  return exc


def describe(exc: BaseException) -> str:
  """A one-line description of an exception for an `error:` or `warning:` line."""
  if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
    msg = exc.args[0]  # str(KeyError) adds quotes
  elif isinstance(exc, OSError) and exc.filename and exc.strerror:
    msg = f"{exc.strerror}: {exc.filename}"
  else:
    msg = str(exc)
  return one_line(msg or type(exc).__name__)


# Exception types that mean "the input is wrong", not "the program is wrong".
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError, ImportError)


def error(message: str, code: int = EXIT_ERROR) -> int:
  """Prints `error: message` (one line) to stderr; returns `code` for `sys.exit`."""
  print(f"error: {one_line(message)}", file=sys.stderr)
  return code


def run(main: Callable[..., int | None], argv: Sequence[str] | None = None,
        user_errors: Iterable[type[BaseException]] = ()) -> int:
  """Calls `main(argv)` and turns an exception into one `error:` line and an exit status.

  User errors (`USER_ERRORS` and `user_errors`) print their message; anything else is reported as
  an internal error with its type, and asks for `MMRET_DEBUG=1` and a bug report. With
  `MMRET_DEBUG=1` every exception propagates with its traceback.
  """
  known = USER_ERRORS + tuple(user_errors)
  try:
    rc = main(argv) if argv is not None else main()
    return int(rc or 0)
  except KeyboardInterrupt:
    if debug():
      raise
    print("error: interrupted", file=sys.stderr)
    return EXIT_SIGINT
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if debug():
      raise
    if isinstance(e, known):
      return error(describe(e))
    return error(f"internal error ({type(e).__name__}: {describe(e)}); rerun with {DEBUG_ENV}=1 for the "
                 "traceback and please report it")


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the package's error style (`error: ...`, exit 2) and defaults shown in --help."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", _HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    sys.exit(error(f"{message} (see `{self.prog} --help`)", EXIT_USAGE))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Keeps the description's line breaks; appends `(default: X)` to options that have one."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or action.required:
      return text
    if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
      return text + " (default: %(default)s)"
    return text


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
  """Up to `n` candidates close to `name` (whole dotted names first, then by the last part)."""
  candidates = list(candidates)
  out = difflib.get_close_matches(name, candidates, n=n, cutoff=0.8)
  leaf = name.rsplit(".", 1)[-1]
  by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
  for m in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.8):
    if by_leaf[m] not in out:
      out.append(by_leaf[m])
  return out[:n]


def suggest(name: str, candidates: Iterable[str]) -> str:
  """`"; did you mean a, b?"` or `""`."""
  m = close_matches(name, candidates)
  return f"; did you mean {', '.join(m)}?" if m else ""

