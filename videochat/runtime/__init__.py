"""Generation on top of the model: request/result types, the official chat format, sampling, detokenising,
the continuous-batching engine and the content caches. Triton-free; imports only `videochat.model` below it."""
