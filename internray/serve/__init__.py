"""Serve stage: a paged-KV, continuous-batching, tensor-parallel engine behind an OpenAI API on Ray Serve."""
