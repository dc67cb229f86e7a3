"""Multi-LoRA serving: an OpenAI-compatible HTTP app over an engine that decodes many users'
adapters in one batch, with a tiered adapter cache fed by the registry."""
