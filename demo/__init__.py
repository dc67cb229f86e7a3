"""`cogcore demo`: the whole loop — serve scripted users, log, sleep (consolidate, refresh, gate,
publish), wake and measure — on the embedded default model."""
