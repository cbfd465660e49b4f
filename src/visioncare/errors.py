"""User-facing errors: raised for bad input or configuration, printed without a traceback."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 20


class VisionCareError(Exception):
    """A problem the user can fix (a path, a config key, a data file); the message says how."""


class DataValidationError(VisionCareError):
    """The dataset failed validation before training; the message lists the offending files/rows."""

    @classmethod
    def from_problems(
        cls, headline: str, problems: Sequence[str], hint: str = ""
    ) -> DataValidationError:
        """One error listing the first 20 problems and how many there are in all."""
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        advice = f"\n{hint}" if hint else ""
        return cls(f"{headline} ({len(problems)} problem(s)):\n{listed}{tail}{advice}")


class ConfigurationError(VisionCareError):
    """A configuration value is missing, inconsistent or unusable."""


class TrainingDivergedError(VisionCareError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_int_at_least(value: object, key: str, minimum: int = 1, also: str = "") -> int:
    """``value`` as an int >= ``minimum``, else a `ConfigurationError` naming ``key``.

    Checked where the value is taken, so `data.batch_size=0` fails before any data is read,
    not inside a DataLoader's sampler with torch's wording. ``also`` names another value the
    key accepts (e.g. ``auto``), for the message.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alternative = f" or {also}" if also else ""
        raise ConfigurationError(
            f"{key}={value!r} is not allowed; use an integer >= {minimum}{alternative}"
        )
    return value
