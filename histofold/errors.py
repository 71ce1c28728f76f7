"""The errors a user can cause. The scripts print these as one line (`error: ...`) and exit 2; any other
exception is a bug and keeps its traceback.

    UsageError        a flag or option is wrong (names the flag and what to pass instead)
    DataError         an input file is missing, malformed or inconsistent (names the file/row and the fix)
    IntegrityError    a file histofold wrote no longer matches its recorded sha256/size/count (names the
                      file and says how to regenerate it)
"""
from __future__ import annotations


class UsageError(ValueError):
    """Something the user can fix; str() is the whole one-line message."""


class DataError(UsageError):
    """A missing, malformed or inconsistent input file."""


class IntegrityError(DataError):
    """A file histofold wrote that is missing, truncated or corrupted."""


class ImageError(Exception):
    """One image cannot be read (unreadable, truncated, zero-byte, wrong shape): a reject reason, not a
    failure of the run; str() is the reason that lands in rejects.csv."""
