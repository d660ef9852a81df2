"""The exceptions that mean "the user must change something" (not a bug): the command line
prints them as one line instead of a traceback."""

from __future__ import annotations

from pdserve.engine.loader import CheckpointError
from pdserve.engine.model_config import ModelConfigError
from pdserve.engine.setup import EngineSetupError
from pdserve.engine.tokenizer import TokenizerError

USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError, ModelConfigError, EngineSetupError, TokenizerError, ValueError,
)
