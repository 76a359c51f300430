"""π0 (openpi): PaliGemma + a Gemma action expert sharing attention, trained with flow matching."""
