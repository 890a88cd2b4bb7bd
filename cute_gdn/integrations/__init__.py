"""Engine integrations: SGLang's linear-attention kernel interface (`integrations.sglang`) and Hugging Face
transformers' Qwen3-Next (`integrations.transformers`). Each is imported on its own, so that cute_gdn never
imports an engine it is not plugged into."""
