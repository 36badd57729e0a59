"""Exceptions with messages that name the problem and the fix.

Every error deltatune raises on bad input derives from `DeltatuneError`, and also from the builtin type a
caller would naturally catch (ValueError, FileNotFoundError, ...), so both styles of handling work.
"""


class DeltatuneError(Exception):
    """Base class of all deltatune errors."""


class AdapterConfigError(DeltatuneError, ValueError):
    """An adapter config is invalid: wrong values, missing required keys, unsupported features."""


class TargetingError(DeltatuneError, ValueError):
    """`target_modules` / `exclude_modules` match nothing, or match modules the method cannot wrap."""


class AdapterNameError(DeltatuneError, ValueError):
    """An adapter name is unknown, already used, or collides with parameter names."""


class AdapterFormatError(DeltatuneError, ValueError):
    """Adapter files on disk are missing, corrupted, or do not fit the model (keys, shapes)."""


class AdapterNotFoundError(DeltatuneError, FileNotFoundError):
    """The adapter folder or one of its required files does not exist."""


class UnsafeFormatError(DeltatuneError, ValueError):
    """A pickle-based file was offered where only safetensors is accepted without an explicit opt-in."""


class BaseModelMismatchError(DeltatuneError, ValueError):
    """The adapter was trained on a different base model than the one it is being loaded onto."""


class MergeError(DeltatuneError, RuntimeError):
    """A merge/unmerge request cannot be carried out safely."""


class CombineError(DeltatuneError, ValueError):
    """Adapters cannot be combined or converted as asked (no exact weight delta, mismatched sources, bad
    method parameters)."""


class GgufExportError(DeltatuneError, ValueError):
    """The model or adapter cannot be written as GGUF (architecture, rope scaling, target modules)."""


class DeltatuneWarning(UserWarning):
    """What deltatune warns of (skipped rows, ignored keys, ...): the command line prints it as one plain line."""


class ConfigError(DeltatuneError, ValueError):
    """A config is malformed: unknown key, wrong type or value, bad override."""


class MissingExtraError(DeltatuneError, ImportError):
    """A command or feature needs an optional extra that is not installed; the message names the pip line."""


def require_extra(extra: str, modules: tuple[str, ...], needed_by: str) -> None:
    """Refuse early, naming the extra to install, when any of `modules` cannot be imported: a user without
    the extra gets one line that says what to do, not a traceback from deep inside the feature."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{needed_by} needs {', '.join(missing)}: pip install 'deltatune[{extra}]'")
