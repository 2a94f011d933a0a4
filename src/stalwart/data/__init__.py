"""Training data: the tokenizer, verifiable tasks and the resumable loader."""
