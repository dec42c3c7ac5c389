"""The inference engine, one module per concept (nano-vllm's layout):

sampling_params  what a request asks for (validated once, at the door)
sequence         one request's tokens, block table and progress
block_manager    the paged KV cache's blocks: free list, reference counts, prefix cache
scheduler        which sequences run this step, and how many of their tokens (chunked prefill)
model_runner     batch -> tensors -> forward -> logits, on one tensor-parallel rank
tp_workers       the other ranks as Ray actors in one torch.distributed group
sampler          logits -> next tokens (+ logprobs)
llm_engine       add_request / step / generate: schedule, run, postprocess
async_engine     the engine on a background thread, streaming to asyncio callers
"""
