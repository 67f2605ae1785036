"""Small pieces every stage shares: the offline default model, tokenizer checks, the shard format, logging."""
