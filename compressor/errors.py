"""The one exception type users see: its message is printed as a single line and the CLI exits 2."""


class CompressorError(Exception):
    """A problem with the user's input (paths, options, data) rather than a bug in compressor."""
