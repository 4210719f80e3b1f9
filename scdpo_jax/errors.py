"""Errors a user can act on. The command line prints them as one line (no traceback) and exits
with status 2 (`ConfigError`: the command line or config is wrong) or 1 (any other `UserError`:
a file, a workdir or the disk needs attention). Each is also the builtin type callers expect
(`ValueError`, `RuntimeError`, `OSError`)."""


class UserError(Exception):
  """An error whose message says what to do; no traceback needed."""


class ConfigError(UserError, ValueError):
  """An invalid config value or combination, found before any weights are loaded."""


def check_choice(key: str, value, supported) -> None:
  """ConfigError `key=value; supported: (...)` unless `value` is one of `supported`."""
  if value not in supported:
    raise ConfigError(f"{key}={value!r}; supported: {supported}")
