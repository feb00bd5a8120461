"""Export errors: each names the stage that failed, what failed and the next step to try."""

from __future__ import annotations

from runtime import AttnxError

STAGES = ("capture", "check", "variants", "parity", "write")


class ExportError(AttnxError):
    """An export failed at one stage: "stage k/N (name): what; next: hint"."""

    def __init__(self, message: str, *, stage: int, hint: str = "") -> None:
        self.stage = stage
        self.stage_name = STAGES[stage - 1]
        self.reason = message
        self.hint = hint
        text = f"stage {stage}/{len(STAGES)} ({self.stage_name}): {message}"
        super().__init__(text + (f"; next: {hint}" if hint else ""))


class UsageError(AttnxError):
    """The command line or API call itself is wrong (exit 2, one line)."""
