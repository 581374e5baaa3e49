"""Test-wide settings: quiet megatron-core's import-time warnings about Apex and TE."""

import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*", category=UserWarning)
