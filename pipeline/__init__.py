"""Crosscoders: layer-agnostic TopK sparse autoencoders on a code LLM's residual stream."""
