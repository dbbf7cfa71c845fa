"""One exception type for user-facing errors: the CLI prints its message on one line and exits non-zero."""


class MimlabError(Exception):
    """A problem with the user's input (path, key, argument): the message names it and says what is wrong."""
