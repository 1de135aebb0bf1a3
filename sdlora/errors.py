"""Errors a user can cause, with messages a person can act on.

The CLI prints them and exits non-zero; the UI shows them as a warning. Anything else
is a bug and keeps its stack trace.
"""


class SdloraError(Exception):
    """Base class for every error caused by input, files or settings rather than a bug."""


class ConfigError(SdloraError):
    """A setting is missing, misspelt or out of range."""


class ModelLoadError(SdloraError):
    """The base model cannot be found, read or recognised."""


class ConceptImagesError(SdloraError):
    """No usable concept image is left after reading the folder."""


class TrainingDiverged(SdloraError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(SdloraError):
    """A checkpoint to resume from is missing or does not match the run."""


class AdapterFormatError(SdloraError):
    """An adapter file is not a LoRA this tool can read, or does not fit the base model."""


class OutOfMemory(SdloraError):
    """The device ran out of memory; the message says which settings to change."""


class TrainingBusy(SdloraError):
    """A second training job was asked for while one runs on the same server."""
