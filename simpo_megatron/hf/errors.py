"""The error of the Hugging Face interop."""


class HFConversionError(ValueError):
    """A model, config field or tensor that cannot be converted; the message names it."""
