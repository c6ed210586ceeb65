"""Errors a user can fix. The CLI prints them as a single line and exits with status 2."""


class StratagemError(Exception):
    """Bad input or state on disk, reported before any work starts."""


class ConfigError(StratagemError):
    """A config file, a command-line override or a flavor name is wrong."""


class ConfigValueError(ConfigError):
    """One key holds an impossible value.

    Raised by the config dataclasses' ``validate()`` with a key relative to their section;
    the loader prefixes the section and the file so the message names all three.
    """

    def __init__(self, key: str, value: object, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key} = {value!r}: {reason}")


class CheckpointError(StratagemError):
    """A run directory or checkpoint cannot be used (corrupt, partial, or another run's)."""
