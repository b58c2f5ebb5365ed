"""lowbit's exception for files it cannot read."""


class FormatError(ValueError):
    """A file is truncated, corrupt, or holds a format or type lowbit does not read; the message
    says what was expected and what was found."""
