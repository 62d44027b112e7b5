"""The one exception type for bad user input: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """Bad input (a missing file, an unknown preset, an out-of-range option) with a message that says the fix."""


class MissingSplit(UserError):
    """A data set has no split of the asked name: a caller that can do without it (a validation split held out of
    train instead) catches this, and only this."""
