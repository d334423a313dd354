"""Errors that segjax reports to the user as one clear line (see launch.py)."""


class SegjaxError(Exception):
  """Base class: a problem the user can fix; launch.py prints it without a traceback."""


class ConfigError(SegjaxError):
  """A config value is unknown, of the wrong type, or incompatible with another."""


class DataError(SegjaxError):
  """A dataset is missing, unreadable, or holds values its spec does not allow."""
