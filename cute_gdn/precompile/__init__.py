"""The warmup precompile CLI (`cute-gdn-precompile`, `python -m cute_gdn.precompile`) and model presets."""
