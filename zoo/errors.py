"""The one error type a user can cause and fix."""


class UserError(Exception):
    """A problem in the user's input (config, file, name, missing data).

    The message names what is wrong and how to fix it; the CLI prints it
    without a traceback and exits with code 2.
    """
